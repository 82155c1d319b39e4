"""The proposer interface: a small class per drafting method, registered by name in ``PROPOSERS``.

A proposer guesses the next tokens of one sequence; the target model then checks them all in one pass
(``spec/verify.py``). It sees only committed tokens: ``propose(tokens, k)`` gets the whole sequence so far
(prompt and output) and ``rollback(valid)`` says how many of them survive verification, so a proposer with
state (a draft model's KV cache) drops what it computed for rejected guesses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch

from frugallm.registry import Registry
from frugallm.sampling import SamplingParams

PROPOSERS: Registry[type[Proposer]] = Registry("speculative proposer")


class Draft(NamedTuple):
    """Guessed tokens and the distributions they were drawn from.

    ``tokens``: up to ``k`` ids. ``probs``: ``[len(tokens), vocab]`` fp32 draft probabilities for rejection
    sampling, or None when the guesses are deterministic (one-hot ``q``: prompt lookup, greedy drafts).
    """

    tokens: list[int]
    probs: torch.Tensor | None = None


class Proposer(ABC):
    """Drafts tokens for one sequence at a time. ``samples`` (capability flag): whether ``propose`` draws from
    a distribution (and returns it) when the request samples; deterministic proposers leave it False. ``free``:
    drafting costs nothing next to a decode step (no model runs) and is deterministic, so the decoder keeps
    drafting while speculation is switched off and checks the guesses against the plain steps' tokens (shadow
    rounds, ``spec/adaptive.py``)."""

    name: ClassVar[str]
    samples: ClassVar[bool] = False
    free: ClassVar[bool] = False

    def begin(self, prompt_ids: list[int], capacity: int) -> None:
        """A new sequence starts; ``capacity`` bounds its length (prompt + output + k)."""
        return  # stateless proposers have nothing to reset

    @abstractmethod
    def propose(
        self, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        """Up to ``k`` tokens that may follow ``tokens`` (may be fewer, or none)."""

    def rollback(self, valid: int) -> None:
        """``tokens[:valid]`` of the last ``propose`` call plus the accepted drafts are final; forget the rest."""
        return  # stateless proposers keep nothing past the committed tokens

    def suspend(self) -> None:
        """Speculation is off for a while (a busy server, a pool short of blocks): free what the next ``propose``
        can rebuild (a draft model's cache), so the memory it held goes back to the budget it was charged to."""
        return  # stateless proposers hold nothing

    def memory_bytes(self) -> int:
        """Memory this proposer holds beyond the target's (SpecMemo accounting): weights and caches."""
        return 0
