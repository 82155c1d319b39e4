"""ThinK: query-driven pruning of key channels (Xu et al., 2024).

For each KV head, channel ``c`` of the keys matters to the attention logits in proportion to
``||Q_obs[:, c]|| * ||K[:, c]||`` (queries of the last ``window`` prompt tokens, summed over the query
heads of the group). The ``ratio`` least important channels are dropped from the prompt's keys before
the observation window, and only the kept ones are stored (``[batch, kv_heads, N, head_dim - pruned]``);
attention then uses the kept channels of q for them (the cache hands back keys with zeros in the
dropped channels: the same logits). As in the paper, the window and every generated key stay full
width (pruning generated keys with the prompt's channel choice doubled perplexity on SmolLM2).
Values are untouched. Composes with kivi and with prefill-time eviction (snapkv), not with evictors
that drop tokens during decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, ChannelPruner, PrefillContext


@KV_POLICIES.register("think")
@dataclass(frozen=True)
class ThinK(ChannelPruner):
    """``think:ratio=0.5,window=32`` (``ratio``: fraction of key channels pruned, in [0, 1))."""

    name: ClassVar[str] = "think"
    needs_queries: ClassVar[bool] = True
    ratio: float = 0.5
    window: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            self._fail(f"ratio must be in [0, 1) (fraction of key channels pruned), got {self.ratio}")
        self._check_int("window", self.window, 1)

    def kept_channels(self, head_dim: int) -> int:
        return max(1, head_dim - math.floor(self.ratio * head_dim))

    def on_prefill(self, ctx: PrefillContext) -> torch.Tensor:
        q, k = ctx.queries, ctx.keys
        b, hq, t, d = q.shape
        hk = k.shape[1]
        w = min(self.window, t)
        qn = q[:, :, t - w:].float().pow(2).sum(2).sqrt().view(b, hk, hq // hk, d).sum(2)  # [b, hk, d]
        kn = (k.float() * ctx.valid[:, None, :, None]).pow(2).sum(2).sqrt()  # [b, hk, d]
        return (qn * kn).topk(self.kept_channels(d), dim=-1).indices.sort(dim=-1).values
