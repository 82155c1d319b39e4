"""The grammar backend interface, its registry, and the constraint a :class:`SamplingParams` asks for."""

from __future__ import annotations

from typing import ClassVar

import torch

from frugallm.registry import Registry
from frugallm.sampling import SamplingParams
from frugallm.tokenizer.tokenizer import Tokenizer


class Matcher:
    """One choice's grammar state. Engine thread only (after :meth:`GrammarBackend.compile` built it)."""

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (``[S, W]`` int32, CPU, contiguous)."""
        raise NotImplementedError

    def accept(self, token: int) -> bool:
        """Advance past a sampled ``token``; False if the grammar did not allow it."""
        raise NotImplementedError

    def copy(self) -> Matcher:
        """An independent matcher in the same state (one per choice of an ``n > 1`` request)."""
        raise NotImplementedError

    @property
    def done(self) -> bool:
        """The grammar is complete: only end-of-generation may follow."""
        raise NotImplementedError


class GrammarBackend:
    """Compiles constraints for one tokenizer and vocabulary. ``kinds``: the constraint kinds it takes."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = ("json_schema", "grammar")

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def compile(self, kind: str, text: str) -> Matcher:
        """A matcher at the start of ``text`` (a JSON schema or a grammar); raises :class:`InvalidRequestError`
        naming what the library rejected. Safe to call from any thread."""
        raise NotImplementedError


BACKENDS: Registry[type[GrammarBackend]] = Registry("structured-output backend")


def constraint_of(params: SamplingParams) -> tuple[str, str] | None:
    """``(kind, text)`` of the constraint ``params`` asks for, or None."""
    if params.json_schema is not None:
        return "json_schema", params.json_schema
    if params.grammar is not None:
        return "grammar", params.grammar
    return None
