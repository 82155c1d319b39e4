"""GemFilter: early layers find the relevant tokens, the full model reads only those (Shi et al., 2024).

The prompt runs through the first ``layer + 1`` layers only (nothing is cached: the probe cache
returns each layer's keys and stops the forward pass at the filter layer). The filter layer's
attention of the last query, summed over heads, ranks the prompt tokens; the top ``budget`` of them
(plus the last ``window`` tokens, so the text right before generation stays whole) are returned in
their original order and the full model prefills that shorter prompt with fresh positions.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, PromptSelector, attention_scores
from frugallm.model.kv_cache import KVCache


class _StopForward(Exception):
    pass


class _ProbeCache(KVCache):
    """Attends within the prompt without storing anything; records the filter layer's scores."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.scores: torch.Tensor | None = None

    def update(self, layer, k, v, *, q=None, x=None, positions=None):  # noqa: ANN001, ANN201
        if layer == self.layer:
            t = k.shape[2]
            self.scores = attention_scores(q[:, :, t - 1:], k, None, q_offset=t - 1)  # [1, kv_heads, T]
            raise _StopForward
        return k, v, None

    def nbytes(self) -> int:
        return 0

    def reserved_bytes(self) -> int:
        return 0

    @property
    def num_slots(self) -> int:
        return 0


@KV_POLICIES.register("gemfilter")
@dataclass(frozen=True)
class GemFilter(PromptSelector):
    """``gemfilter:budget=0.25,layer=<num_layers // 3>,window=8``."""

    name: ClassVar[str] = "gemfilter"
    needs_queries: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = True
    budget: float = 0.25
    layer: int | None = None
    window: int = 8

    def __post_init__(self) -> None:
        self._check_fraction("budget", self.budget)
        self._check_int("layer", self.layer, 0, allow_none=True)
        self._check_int("window", self.window, 1)

    def filter_layer(self, num_layers: int) -> int:
        layer = num_layers // 3 if self.layer is None else self.layer
        if layer >= num_layers:
            self._fail(f"layer must be below the model's {num_layers} layers, got {layer}")
        return layer

    @torch.inference_mode()
    def select(self, model: Any, prompt_ids: list[int]) -> list[int]:
        n = len(prompt_ids)
        k = min(n, max(math.ceil(self.budget * n), self.window))
        if k >= n:
            return list(prompt_ids)
        probe = _ProbeCache(self.filter_layer(len(model.layers)))
        dev = model.embed_tokens.weight.device
        ids = torch.tensor([prompt_ids], device=dev)
        with contextlib.suppress(_StopForward):  # the probe stops the forward pass at the filter layer
            model(ids, torch.arange(n, device=dev)[None], probe, "last")
        assert probe.scores is not None
        scores = probe.scores[0].sum(0)  # [T]
        scores[max(0, n - self.window):] = float("inf")
        keep = scores.topk(k).indices.sort().values.tolist()
        return [prompt_ids[i] for i in keep]
