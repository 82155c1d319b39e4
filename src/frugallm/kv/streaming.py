"""StreamingLLM: attention sinks + a recent window (Xiao et al., 2024).

The first ``sinks`` tokens (which soak up attention mass) and the most recent tokens are kept; the
cache holds ``sinks + window`` slots (or ``budget`` of the prompt) and slides during generation.

Positions: with ``positions=cache`` (default, the paper's way) the cache stores keys *unrotated* and
re-rotates them at every step by their index in the cache, so the query always sees distances
``0 .. cache_size - 1`` even after thousands of evictions; this is what keeps generation past the
window fluent. ``positions=original`` keeps keys rotated at their original positions (the naive
variant: relative distances to the sinks grow without bound); only it runs on the paged engine, whose
pool keeps keys rotated (its window slides in place there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, DecodeContext, Evictor, PrefillContext, first_valid_mask

DEFAULT_WINDOW = 1020


@KV_POLICIES.register("streamingllm")
@dataclass(frozen=True)
class StreamingLLM(Evictor):
    """``streamingllm:sinks=4,window=1020`` or ``streamingllm:budget=0.25`` (``positions``: cache | original)."""

    name: ClassVar[str] = "streamingllm"
    evicts_during_decode: ClassVar[bool] = True
    pages: ClassVar[bool] = True
    budget: float | None = None
    sinks: int = 4
    window: int | None = None
    positions: str = "cache"

    def __post_init__(self) -> None:
        self._check_fraction("budget", self.budget, allow_none=True)
        self._check_int("sinks", self.sinks, 0)
        self._check_int("window", self.window, 1, allow_none=True)
        if self.budget is not None and self.window is not None:
            self._fail("give either window (fixed cache size) or budget (fraction of the prompt), not both")
        if self.positions not in ("cache", "original"):
            self._fail(f"positions must be cache or original, got {self.positions!r}")

    @property
    def changes_positions(self) -> bool:
        return self.positions == "cache"

    def paging_error(self) -> str | None:
        if self.positions == "cache":
            return ("positions=cache re-rotates every key by its cache slot at each step, but the paged pool keeps "
                    "keys rotated; use positions=original under batching")
        return None

    @property
    def sliding_sinks(self) -> int:
        return self.sinks

    @property
    def size(self) -> int | None:
        """Fixed cache size (sinks + window), or None in budget mode."""
        if self.budget is not None:
            return None
        return self.sinks + (self.window if self.window is not None else DEFAULT_WINDOW)

    def prefill_keep(self, n_tokens: int, layer: int, num_layers: int) -> int:
        if self.size is None:
            return max(1, min(n_tokens, math.ceil(self.budget * n_tokens)))
        return min(n_tokens, self.size)

    def decode_capacity(self, kept: int) -> int:
        return kept if self.size is None else self.size

    def _scores(self, valid: torch.Tensor, heads: int) -> torch.Tensor:
        recency = torch.arange(valid.shape[1], device=valid.device, dtype=torch.float32).expand(valid.shape)
        scores = torch.where(first_valid_mask(valid, self.sinks), float("inf"), recency)
        return scores[:, None].expand(-1, heads, -1)

    def on_prefill(self, ctx: PrefillContext) -> torch.Tensor:
        return self._scores(ctx.valid, ctx.keys.shape[1])

    def on_decode(self, ctx: DecodeContext) -> torch.Tensor:
        return self._scores(ctx.valid, ctx.keys.shape[1])
