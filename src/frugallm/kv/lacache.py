"""LaCache: ladder-shaped KV caching (Shi et al., 2025).

Every layer keeps the sinks, a recent window and one contiguous *band* of older tokens, and the band
shifts from layer to layer: the first layer keeps the oldest band, the last layer the band right
before the recent window, the layers between interpolate. Stacked, the bands form a ladder that
covers the whole context although each layer holds only ``budget`` of it. During generation the
cache is compacted iteratively: when a layer reaches its budget, the same ladder rule drops a chunk
of ``compact`` x budget of its older slots, so the covered span keeps stretching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, DecodeContext, Evictor, PrefillContext, first_valid_mask, recent_mask


@KV_POLICIES.register("lacache")
@dataclass(frozen=True)
class LaCache(Evictor):
    """``lacache:budget=0.25,sinks=4,recent=0.25,compact=0.125``."""

    name: ClassVar[str] = "lacache"
    evicts_during_decode: ClassVar[bool] = True
    budget: float = 0.25
    sinks: int = 4
    recent: float = 0.25
    compact: float = 0.125

    def __post_init__(self) -> None:
        self._check_fraction("budget", self.budget)
        self._check_int("sinks", self.sinks, 0)
        if not 0.0 <= self.recent <= 1.0:
            self._fail(f"recent must be in [0, 1] (share of the budget for recent tokens), got {self.recent}")
        self._check_fraction("compact", self.compact)

    def decode_keep(self, n_slots: int, capacity: int) -> int:
        return max(1, capacity - max(1, math.ceil(self.compact * capacity)))

    def ladder(self, valid: torch.Tensor, keep: int, layer: int, num_layers: int, heads: int) -> torch.Tensor:
        """Scores ``[b, heads, N]``: sinks and recent ``+inf``, this layer's band 1, others by distance."""
        sink = first_valid_mask(valid, self.sinks)
        n_recent = round(self.recent * keep)
        recent = recent_mask(valid, n_recent) & valid
        older = valid & ~sink & ~recent
        band = max(0, keep - int(sink.sum(1).max()) - n_recent)
        rank = older.long().cumsum(1) - 1
        total = older.sum(1, keepdim=True)
        frac = layer / (num_layers - 1) if num_layers > 1 else 0.0
        start = torch.round(frac * (total - band).clamp(min=0))
        dist = torch.maximum(start - rank, rank - (start + band - 1)).float()
        scores = torch.where(dist <= 0, torch.ones_like(dist), -dist)
        scores = torch.where(sink | recent, float("inf"), scores)
        return scores[:, None].expand(-1, heads, -1)

    def on_prefill(self, ctx: PrefillContext) -> torch.Tensor:
        keep = self.prefill_keep(ctx.keys.shape[2], ctx.layer, ctx.num_layers)
        return self.ladder(ctx.valid, keep, ctx.layer, ctx.num_layers, ctx.keys.shape[1])

    def on_decode(self, ctx: DecodeContext) -> torch.Tensor | None:
        if ctx.keys.shape[2] <= ctx.capacity:
            return None
        keep = self.decode_keep(ctx.keys.shape[2], ctx.capacity)
        return self.ladder(ctx.valid, keep, ctx.layer, ctx.num_layers, ctx.keys.shape[1])
