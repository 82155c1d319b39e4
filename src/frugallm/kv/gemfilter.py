"""GemFilter: early layers find the relevant tokens, the full model reads only those (Shi et al., 2024).

The prompt runs through the first ``layer + 1`` layers only (nothing is cached: the probe cache
returns each layer's keys and stops the forward pass inside the filter layer, before its attention).
There only the last ``window`` queries attend: their attention, summed over queries and heads, ranks
the prompt tokens; the top ``budget`` of them (plus the last ``window`` tokens, so the text right
before generation stays whole) are returned in their original order and the full model prefills that
shorter prompt with fresh positions. Time to first token is then about ``(layer + 1) / num_layers`` of
a full prefill plus the prefill of ``budget`` of the prompt.

The filter layer is model specific (the paper uses 13 of 32 for Llama-3-8B). On Qwen2.5-Coder-0.5B
(24 layers) the top 25% by the last 8 queries keeps every token of the passkey at layers 4-10 and
few of them at layers 0-3 (``benchmarks/kv_long_bench.py --tasks layers``, 2k and 8k prompts), so
``layer=5`` (one layer of margin) is the cheap choice there; the default stays the paper-like
``num_layers // 3``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, PromptSelector, attention_scores, windowed_keep
from frugallm.model.kv_cache import KVCache
from frugallm.model.ops import model_device


class StopForward(Exception):
    """Raised by :class:`ProbeCache` to end a forward pass early."""


class ProbeCache(KVCache):
    """Attends within the prompt without storing anything; records the last ``window`` queries' attention
    ``[1, kv_heads, T]`` at layer ``last`` (and at every layer before it with ``every_layer``), then stops
    the forward pass by raising :class:`StopForward`. The benchmark's layer scan reuses it."""

    def __init__(self, last: int, window: int, every_layer: bool = False) -> None:
        self.last, self.window, self.every_layer = last, window, every_layer
        self.scores: list[torch.Tensor] = []

    def update(self, layer, k, v, *, q=None, x=None, positions=None):  # noqa: ANN001, ANN201
        if self.every_layer or layer == self.last:
            t = k.shape[2]
            w = min(self.window, t)
            self.scores.append(attention_scores(q[:, :, t - w:], k, None, q_offset=t - w))
        if layer == self.last:
            raise StopForward
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
    """``gemfilter:budget=0.25,layer=<num_layers // 3>,window=8``.

    ``window``: the last tokens always kept, whose queries also score the others at the filter layer.
    """

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
        k = windowed_keep(n, self.budget, self.window)
        if k >= n:
            return list(prompt_ids)
        probe = ProbeCache(self.filter_layer(len(model.layers)), self.window)
        dev = model_device(model)  # a GGUF run as stored has no embed_tokens.weight
        ids = torch.tensor([prompt_ids], device=dev)
        with contextlib.suppress(StopForward):  # the probe stops the forward pass at the filter layer
            model(ids, torch.arange(n, device=dev)[None], probe, "last")
        scores = probe.scores[-1][0].sum(0)  # [T]
        scores[max(0, n - self.window):] = float("inf")
        keep = scores.topk(k).indices.sort().values.tolist()
        return [prompt_ids[i] for i in keep]
