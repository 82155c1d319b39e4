"""The ``frugallm`` backend: :class:`frugallm.LLM` (``quant=`` / ``kv=`` / ``spec=`` passed through only when
given), and what a model file's own quantization was (:func:`source_quantization`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from frugallm.errors import FrugalError
from frugallm.lab.peers.base import DTYPE_NAMES, BatchResult, RequestTiming, Runner

_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def source_quantization(loaded: Any) -> str | None:
    """How the model file's weights were already quantized, e.g. ``"GGUF Q4_1 67% + Q8_0 31%"`` (shares of the
    tensor bytes), or None for float weights. ``--quant`` on such a file re-quantizes quantized weights, and the
    fp32 reference is that file dequantized, not the original model."""
    if loaded.source_format == "quantized":
        return f"frugallm quantized folder ({loaded.source_info.get('quant_spec')})"
    types = loaded.source_info.get("tensor_type_bytes") or {}
    quant = {k: v for k, v in types.items() if k.upper() not in _FLOAT_TYPES}
    if not quant:
        return None
    total = sum(types.values())
    parts = sorted(quant.items(), key=lambda kv: -kv[1])
    return f"{loaded.source_format.upper()} " + " + ".join(f"{k} {v / total:.0%}" for k, v in parts)


class FrugalRunner(Runner):
    backend = "frugallm"
    can_score = True

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", threads: int | None = None,
                 quant: str | None = None, kv: str | None = None, use_cache: bool = True,
                 spec: str | None = None, weights: str = "auto") -> None:
        from frugallm import LLM

        extra: dict[str, Any] = {} if weights == "auto" else {"weights": weights}
        if quant:
            extra["quant"] = quant
        if kv:
            extra["kv"] = kv
        if spec:
            extra["spec"] = spec
        t0 = time.perf_counter()
        try:
            self.llm = LLM(model, dtype=dtype, device=device, threads=threads, use_cache=use_cache, **extra)
        except TypeError as e:
            if extra and "unexpected keyword" in str(e):
                raise FrugalError(f"this frugallm build does not support {'/'.join(extra)} options yet: {e}") from None
            raise
        self.load_s = time.perf_counter() - t0
        self.config, self.tokenizer = self.llm.config, self.llm.tokenizer
        self.path = Path(self.llm.loaded.path)
        self.source_quantization = source_quantization(self.llm.loaded)
        self.dtype = DTYPE_NAMES.get(self.llm.dtype, str(self.llm.dtype))
        self.device = str(self.llm.device)

    def weight_bytes(self) -> int:
        return int(self.llm.weight_bytes())

    def take_spec_stats(self) -> Any:
        """The ``frugallm.spec.SpecStats`` of the runs since the last call (None without ``spec=``)."""
        from frugallm.spec import SpecStats

        if self.llm.spec_cfg is None:
            return None
        stats, self.llm.spec_stats = self.llm.spec_stats, SpecStats()
        return stats

    @contextlib.contextmanager
    def speculation_off(self) -> Iterator[None]:
        """Decode without ``spec=`` for a while: the same loaded model (and draft) as the speculative runs."""
        cfg, self.llm.spec_cfg = self.llm.spec_cfg, None
        try:
            yield
        finally:
            self.llm.spec_cfg = cfg

    def compute_dtype(self, tokens: int) -> str:
        """What ``Transformer.forward`` picks: ``prefill_dtype`` from ``PREFILL_MIN_TOKENS`` tokens on (CPU fp16
        models: bf16 where the CPU multiplies it natively, else fp32), ``decode_dtype`` below, else the
        weights' dtype; quantized CPU matmuls then run in ``quant.kernels.compute_dtype`` of that."""
        from frugallm.model.llama import PREFILL_MIN_TOKENS

        model = self.llm.model
        act = (model.prefill_dtype if tokens >= PREFILL_MIN_TOKENS else model.decode_dtype) or self.llm.dtype
        if self.llm.quant_spec is not None:
            from frugallm.quant.kernels import compute_dtype

            act = compute_dtype(self.llm.device, act)
        return DTYPE_NAMES.get(act, str(act))

    def generate(self, prompts: list[list[int]], gen_len: int) -> BatchResult:
        from frugallm import SamplingParams

        params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        reqs = [RequestTiming(o.metrics["ttft_s"], o.metrics.get("tpot_s"), o.metrics["e2e_s"],
                              len(o.token_ids)) for o in outs]
        kv = outs[0].metrics.get("kv_cache_bytes")
        return BatchResult(reqs, wall, None if kv is None else int(kv))

    def score(self, token_ids: list[int]) -> torch.Tensor:
        return self.llm.score(token_ids).float()

