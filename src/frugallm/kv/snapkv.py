"""SnapKV: observation-window voting at prefill (Li et al., 2024).

The last ``window`` prompt queries vote: their attention over the prefix (summed over the window and
over the query heads of each KV group), max-pooled with ``kernel`` so neighbours of an important
token survive with it, picks the top prefix tokens per KV head; the window itself is always kept.
Compression happens once, at prefill; generated tokens are appended without eviction (as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from frugallm.kv.policy import KV_POLICIES, Evictor, PrefillContext, attention_scores, windowed_keep


@KV_POLICIES.register("snapkv")
@dataclass(frozen=True)
class SnapKV(Evictor):
    """``snapkv:budget=0.25,window=32,kernel=5,pooling=max`` (pooling: max or avg)."""

    name: ClassVar[str] = "snapkv"
    needs_queries: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = True
    pages: ClassVar[bool] = True
    budget: float = 0.25
    window: int = 32
    kernel: int = 5
    pooling: str = "max"

    def __post_init__(self) -> None:
        self._check_fraction("budget", self.budget)
        self._check_int("window", self.window, 1)
        self._check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            self._fail(f"kernel must be odd (pooling keeps slot alignment), got {self.kernel}")
        if self.pooling not in ("max", "avg"):
            self._fail(f"pooling must be max or avg, got {self.pooling!r}")

    def prefill_keep(self, n_tokens: int, layer: int, num_layers: int) -> int:
        return windowed_keep(n_tokens, self.budget, self.window)

    def prefill_queries(self, n_tokens: int) -> int:
        return min(self.window, n_tokens)

    def on_prefill(self, ctx: PrefillContext) -> torch.Tensor:
        t = ctx.keys.shape[2]
        w = min(self.window, t)
        # The queries of the last w prompt positions (ctx.queries ends at the prompt's last token).
        votes = attention_scores(ctx.queries[:, :, -w:], ctx.keys, ctx.valid, q_offset=t - w)  # [b, h, T]
        b, h, _ = votes.shape
        prefix = votes[:, :, : t - w].reshape(b * h, 1, t - w)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        if t - w > 0:
            prefix = pool(prefix, self.kernel, stride=1, padding=self.kernel // 2)
        window = torch.full((b, h, w), float("inf"), device=votes.device)
        return torch.cat([prefix.view(b, h, t - w), window], dim=2)
