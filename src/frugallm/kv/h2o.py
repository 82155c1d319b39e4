"""H2O: heavy hitters + recent tokens (Zhang et al., 2023).

Each KV head keeps the tokens with the largest *accumulated* attention probability (summed over
every query that has seen them, over the query heads of its group) plus the most recent tokens.
The cache size stays at ``budget`` of the prompt: after every decode step the lowest-scoring
non-recent slot of each head is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, DecodeContext, Evictor, PrefillContext, attention_scores, recent_mask


@KV_POLICIES.register("h2o")
@dataclass(frozen=True)
class H2O(Evictor):
    """``h2o:budget=0.25,recent=0.5`` (``recent``: share of the kept slots reserved for the newest tokens)."""

    name: ClassVar[str] = "h2o"
    needs_queries: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = True
    evicts_during_decode: ClassVar[bool] = True
    pages: ClassVar[bool] = True
    budget: float = 0.25
    recent: float = 0.5

    def __post_init__(self) -> None:
        self._check_fraction("budget", self.budget)
        if not 0.0 <= self.recent <= 1.0:
            self._fail(f"recent must be in [0, 1] (share of the budget for recent tokens), got {self.recent}")

    def _scores(self, acc: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
        scores = acc.clone()
        scores[recent_mask(valid, round(self.recent * keep))[:, None].expand_as(scores)] = float("inf")
        return scores

    def on_prefill(self, ctx: PrefillContext) -> torch.Tensor:
        acc = attention_scores(ctx.queries, ctx.keys, ctx.valid, q_offset=0)  # [b, h, T]
        ctx.stats["h2o_acc"] = acc
        keep = self.prefill_keep(acc.shape[2], ctx.layer, ctx.num_layers)
        return self._scores(acc, ctx.valid, keep)

    def on_decode(self, ctx: DecodeContext) -> torch.Tensor:
        n, t = ctx.keys.shape[2], ctx.new_tokens
        acc = ctx.stats["h2o_acc"]
        acc = torch.cat([acc, acc.new_zeros(*acc.shape[:2], n - acc.shape[2])], dim=2)
        acc += attention_scores(ctx.queries, ctx.keys, ctx.valid, q_offset=n - t)
        ctx.stats["h2o_acc"] = acc
        return self._scores(acc, ctx.valid, ctx.capacity)
