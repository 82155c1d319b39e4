"""Structured output: token masks that keep generation inside a grammar (JSON schema, JSON object, Lark).

A :class:`~frugallm.structured.backend.GrammarBackend` (registered by name; ``llguidance`` is the one shipped,
chosen by ``benchmarks/structured_pick.py``) compiles a request's constraint once, in the caller's thread, into a
:class:`~frugallm.structured.backend.Matcher` per choice; the engine fills each running constrained sequence's
row of one ``[S, ceil(vocab / 32)]`` bitmask per step and masks the logits before sampling
(:func:`~frugallm.structured.masks.apply_bitmask`).
"""

from frugallm.structured.backend import BACKENDS, GrammarBackend, Matcher, constraint_of
from frugallm.structured.masks import apply_bitmask
from frugallm.structured.select import backend_for

__all__ = ["BACKENDS", "GrammarBackend", "Matcher", "apply_bitmask", "backend_for", "constraint_of"]
