"""What ``LLM(...)`` decides and applies around loading: device and dtype, CPU compute dtypes and weight packing,
quantization at load (GPTQ's calibration pass), LoRA adapter slots, ``torch.compile`` of the decode step.

Plain functions over the loaded model, called in this order by ``LLM.__init__``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import psutil
import torch

from frugallm import cpu
from frugallm.errors import FrugalError
from frugallm.loading.base import STORED_MODES

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FrugalError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FrugalError("device cuda requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # CUDA: bf16 (no fp16 overflow risk, same speed). CPU: bf16 where frugallm's native bf16 kernel
        # runs (AVX512-BF16; the fastest decode there: 122.6 vs 109.6 tok/s for fp16), else fp16, whose
        # matrix-vector products (decode) stream weights ~2x faster than bf16 through F.linear; large
        # matmuls switch to the CPU's fast compute dtype inside Linear (see set_cpu_dtypes).
        if device.type == "cpu":
            from frugallm.model import packed

            return torch.bfloat16 if packed.backend(2) == "native" else torch.float16
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise FrugalError(f"unknown dtype {dtype!r}; choices: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def set_cpu_dtypes(model: Any, dtype: torch.dtype, weights: str) -> None:
    """On CPU, the dtypes ``model`` prefills and decodes in where they differ from its weights' ``dtype``."""
    if dtype == torch.float16 or weights in STORED_MODES:
        # Prefill is compute bound: bf16 where the CPU multiplies it natively (AVX512-BF16 / AMX), else
        # fp32 (fp16 and emulated bf16 matmuls run at ~1.5 GFLOP/s on an AVX2 CPU, fp32 at 60-88).
        # Weights run as stored are dequantized to this dtype per prefill pass (GGUFLinear).
        model.prefill_dtype = torch.bfloat16 if cpu.fast_bf16() else torch.float32
    # Not for "stored-q8": int8 codes of activations already rounded to bf16 lose more (perplexity +0.55 % over
    # exact instead of +0.35 %) and the q8 kernel gains nothing from bf16 input.
    if weights == "stored" and cpu.fast_bf16():
        # Decode in bf16 too: the kernel multiplies the codes with the bf16 activations in vdpbf16ps (exact
        # products, fp32 sums; Q4_K / Q6_K 1.2-1.6x its fp32-activation path at one row); the rest of the
        # step runs as a bf16 model's. ``model.decode_dtype = torch.float32`` restores the fp32 path.
        model.decode_dtype = torch.bfloat16


def quantize(model: Any, spec: Any, tokenizer: Any, score: Callable[[list[int]], Any], calib: str | None) -> None:
    """Quantize ``model`` in place by ``spec`` (a ``frugallm.quant`` spec); GPTQ calibrates on ``calib`` (a text file;
    default: the built-in corpus), running ``score`` (``LLM.score``) over windows of it."""
    from frugallm.quant import quantize_model

    run_calib = None
    if spec.method == "gptq":
        from frugallm.corpus import load_corpus
        from frugallm.quant.calibrate import StopCalibration

        # The corpus tail: quality evaluation (lab/quality.py) scores windows from the start of the same
        # built-in corpus, so calibrating on its head would evaluate GPTQ on its calibration tokens.
        ids = tokenizer.encode(load_corpus(calib)[-200_000:])
        windows = [ids[i : i + 256] for i in range(0, min(len(ids), 16 * 256) - 255, 256)]

        def run_calib() -> None:
            for w in windows:
                with contextlib.suppress(StopCalibration):  # the block being calibrated was reached
                    score(w)

        run_calib.stops_early = True  # type: ignore[attr-defined]

    quantize_model(model, spec, calib=run_calib)


def set_packing(model: Any, pack_weights: bool | None) -> None:
    """bf16 CPU linears on packed copies; None: only when the copies take at most a quarter of the free memory."""
    pack = model.set_packing(pack_weights is not False)
    if pack and pack_weights is None and pack > psutil.virtual_memory().available // 4:
        model.set_packing(False)


def lora_slots(model: Any, config: Any, dtype: torch.dtype, adapters: Mapping[str, Any], max_loras: int,
               max_lora_rank: int) -> Any:
    """A ``LoraManager`` with ``max_loras`` slots beside every projection, ``adapters`` ``{name: folder}`` loaded."""
    from frugallm.lora import LoraManager

    if not isinstance(adapters, Mapping):
        raise FrugalError(f"lora must be a mapping {{name: adapter folder}}, got {type(adapters).__name__}")
    # Adapters compute in the decode activations' dtype (bf16 for half and as-stored CPU models).
    dtype = model.decode_dtype or dtype
    lora = LoraManager(model, config, max_loras, max_lora_rank, torch.bfloat16 if dtype == torch.float16 else dtype)
    for name, path in adapters.items():
        lora.add(name, path)
    return lora


def compile_decode(model: Any, device: torch.device, make_cache: Callable[[int, int], Any]) -> float:
    """Compile ``model``'s decode step now (one dummy step on ``make_cache(1, 2)``); the seconds it took (inductor
    caches the result on disk)."""
    from frugallm.paths import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    model.compile_decode()
    t0 = time.perf_counter()
    with torch.inference_mode():
        one = torch.zeros(1, 1, dtype=torch.long, device=device)
        model(one, one, make_cache(1, 2))
    return time.perf_counter() - t0
