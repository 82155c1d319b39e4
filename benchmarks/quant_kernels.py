"""Micro-benchmark: one pass over every weight matrix of SmolLM2-135M with each weight format.

For each format the 30 layers x (qkv, o, gate_up, down) + lm_head matrices are built from random
Gaussian weights (distinct per matrix, so the pass streams ~135M weights from memory like a real decode
step), then each matrix is applied to ``--rows`` token rows (1 = batch-1 decode, matrix-vector products).
Prints the median time of ``--runs`` passes, the bytes the format stores and the achieved weight
bandwidth (stored bytes / time).

    .venv/bin/python benchmarks/quant_kernels.py [--rows 1] [--runs 7] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.quant import QUANT_METHODS, parse_quant_spec

HIDDEN, INTER, LAYERS, VOCAB, Q_DIM, KV_DIM = 576, 1536, 30, 49152, 576, 192
SHAPES = [(Q_DIM + 2 * KV_DIM, HIDDEN), (HIDDEN, Q_DIM), (2 * INTER, HIDDEN), (HIDDEN, INTER)] * LAYERS
SHAPES.append((VOCAB, HIDDEN))  # lm_head, [out, in]

FORMATS: dict[str, str | torch.dtype] = {
    "fp32 F.linear": torch.float32,
    "bf16 F.linear": torch.bfloat16,
    "fp16 F.linear": torch.float16,
    "Int8Linear": "int8",
    "GroupQuant int4 g32": "int4:group=32",
    "GroupQuant int6 g64": "int6:group=64",
    "GroupQuant int3 g32": "int3:group=32",
    "GroupQuant int2 g32": "int2:group=32",
    "LLMInt8Linear": "llm.int8",
    "Mix4Linear g32": "mix4:group=32",
}


def build(fmt: str | torch.dtype, device: torch.device) -> tuple[list[Callable[[torch.Tensor], torch.Tensor]], int]:
    """Callables applying every matrix of the model in ``fmt``, and the bytes they store."""
    gen = torch.Generator().manual_seed(0)
    fns: list[Callable[[torch.Tensor], torch.Tensor]] = []
    nbytes = 0
    method = None if isinstance(fmt, torch.dtype) else QUANT_METHODS.get(parse_quant_spec(fmt).method)(
        parse_quant_spec(fmt)
    )
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=gen) * 0.02
        if method is None:
            assert isinstance(fmt, torch.dtype)
            wd = w.to(device, fmt)
            nbytes += wd.numel() * wd.element_size()
            fns.append(lambda x, wd=wd: F.linear(x, wd))
        else:
            lin = nn.Linear(in_f, out_f, bias=False, device=device)
            lin.weight.data.copy_(w)
            mod = method(lin)
            nbytes += mod.weight_bytes()
            fns.append(mod)
    return fns, nbytes


def time_pass(fns: list[Callable[[torch.Tensor], torch.Tensor]], xs: dict[int, torch.Tensor], runs: int,
              device: torch.device) -> list[float]:
    def one() -> None:
        for f, (_, in_f) in zip(fns, SHAPES, strict=True):
            f(xs[in_f])
        if device.type == "cuda":
            torch.cuda.synchronize()

    one()  # warm-up: kernel selection, layout probes, allocator
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="token rows per matmul (1 = decode)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", help="subset of formats: words that start a format name's word")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_weights = sum(o * i for o, i in SHAPES)
    print(f"SmolLM2-135M matrices: {len(SHAPES)} ({n_weights / 1e6:.1f}M weights), rows={args.rows}, "
          f"device={device}, threads={torch.get_num_threads()}, runs={args.runs}, torch {torch.__version__}")
    print(f"{'format':<22}{'median ms':>10}{'min ms':>9}{'MB stored':>11}{'GB/s':>8}{'x fp32':>8}")
    base = None
    for name, fmt in FORMATS.items():
        if args.only and not any(re.search(rf"\b{re.escape(s)}", name, re.IGNORECASE) for s in args.only):
            continue
        with torch.no_grad():
            fns, nbytes = build(fmt, device)
            # Quantized modules get the activations a model would feed them: fp32 on CPU (they compute in
            # bf16 internally), bf16 on GPU.
            act_dtype = fmt if isinstance(fmt, torch.dtype) else (
                torch.float32 if device.type == "cpu" else torch.bfloat16)
            xs = {i: torch.randn(args.rows, i, device=device, dtype=act_dtype) for i in {s[1] for s in SHAPES}}
            times = time_pass(fns, xs, args.runs, device)
        med = statistics.median(times)
        base = base or med
        print(f"{name:<22}{med * 1e3:>10.2f}{min(times) * 1e3:>9.2f}{nbytes / 1e6:>11.1f}"
              f"{nbytes / med / 1e9:>8.2f}{base / med:>8.2f}", flush=True)
        del fns, xs
        gc.collect()


if __name__ == "__main__":
    main()
