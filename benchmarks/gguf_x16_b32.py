"""Q4_0 / Q4_1 / Q8_0 in the x16 layout (``csrc/gguf_x16_b32.cpp``) beside the stored-block kernel
(``csrc/gguf_linear.cpp``), at SmolLM2-135M's shapes (issue 13: 135M decode).

Per type, shape (N x K), x dtype, threads and rows: median µs of ``gguf_linear`` on the stored blocks and of
``gguf_x16_b32_linear`` on the repacked ones, interleaved rep by rep, their ratio (``stored/x16`` > 1: the x16
layout is faster) and the weight bytes read per µs (GB/s). Run it once per ISA level: ``FRUGALLM_ISA=avx2``
forces the AVX2 builds on an AVX-512 machine.

    .venv/bin/python benchmarks/gguf_x16_b32.py [--types Q4_1 Q4_0 Q8_0] [--shape 576x576 1536x576 576x1536]
        [--head 49152x576] [--threads 1 2] [--rows 1 2 4] [--dtype bfloat16 float32] [--reps 200]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

from frugallm import native

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from gguf_blocks import random_blocks  # noqa: E402  (shared with the kernel tests)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_kernels import median_us  # noqa: E402  (interleaved medians, one definition)
from gguf_rows import header  # noqa: E402  (the CPU line)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["Q4_1", "Q4_0", "Q8_0"])
    p.add_argument("--shape", nargs="+", default=["576x576", "1536x576", "576x1536"])
    p.add_argument("--head", nargs="*", default=["49152x576"], help="shapes run for Q8_0 only (the tied head)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args()
    if not (native.usable("gguf_linear") and native.usable("gguf_x16_b32")):
        sys.exit("error: the native gguf_linear / gguf_x16_b32 kernels are unavailable on this machine")
    cases = [(t, s) for t in args.types for s in args.shape] + [("Q8_0", s) for s in args.head if "Q8_0" in args.types]
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(header(threads))
        print(f"{'type':<6}{'shape':>11}{'x':>10}{'rows':>5}{'stored µs':>11}{'x16 µs':>9}{'stored/x16':>11}"
              f"{'x16 GB/s':>10}")
        for name, shape in cases:
            n, k = (int(v) for v in shape.lower().split("x"))
            qtype = int(T[name])
            raw = torch.from_numpy(random_blocks(T[name], n, k))
            w16 = torch.ops.frugallm.gguf_x16_b32_repack(raw, qtype)
            for dname in args.dtype:
                for rows in args.rows:
                    x = torch.randn(rows, k).to(getattr(torch, dname))
                    us = median_us({"stored": partial(torch.ops.frugallm.gguf_linear, x, raw, qtype, n, None),
                                    "x16": partial(torch.ops.frugallm.gguf_x16_b32_linear, x, w16, qtype, n, None)},
                                   args.reps)
                    print(f"{name:<6}{shape:>11}{dname:>10}{rows:>5}{us['stored']:>11.1f}{us['x16']:>9.1f}"
                          f"{us['stored'] / us['x16']:>11.2f}{raw.numel() / us['x16'] / 1e3:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
