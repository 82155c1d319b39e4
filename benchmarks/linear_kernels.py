"""bf16 CPU linears over all of the default model's weight matrices: the native kernel vs oneDNN vs F.linear.

SmolLM2-135M's shapes (30 layers x qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, plus the
49152x576 head), random bf16 weights, one pass over all of them per timing (270 MB: the weights come from
DRAM, as in a decode step). Median ms per pass for each row count.

    python benchmarks/linear_kernels.py --threads 2 --rows 1 4 16 32 64 256
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from attention_kernels import median_us  # same folder: the scripts share their timer

from frugallm.model import packed

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 64, 256])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if packed.backend(576) != "native":
        raise SystemExit("the native bf16 kernel is not available here (no AVX512-BF16, or it did not build)")
    weights = [torch.randn(n, k).bfloat16() for n, k in SHAPES]
    native = [packed.pack(w, None) for w in weights]
    onednn = [packed.Packed("onednn", torch.ops.mkldnn._reorder_linear_weight(w, 16), None, w.shape[0])
              for w in weights]
    total = sum(w.numel() for w in weights)
    print(f"torch {torch.__version__}, {args.threads} threads, {total * 2 / 1e6:.0f} MB of bf16 weights per pass")
    print("| rows | native ms | oneDNN packed ms | F.linear ms | native GB/s | native GFLOP/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k).bfloat16() for k in (576, 1536)}

        def run(kind: str, xs=xs) -> None:
            for w, pn, po in zip(weights, native, onednn, strict=True):
                x = xs[w.shape[1]]
                if kind == "native":
                    torch.ops.frugallm.bf16_linear(x, pn.weight, None, pn.out_features)
                elif kind == "onednn":
                    packed.linear(x, po, w, None)
                else:
                    F.linear(x, w)

        t = {kind: median_us(lambda kind=kind: run(kind), args.rounds) / 1e3 for kind in ("native", "onednn", "plain")}
        print(f"| {rows} | {t['native']:.2f} | {t['onednn']:.2f} | {t['plain']:.2f} | "
              f"{total * 2 / t['native'] / 1e6:.0f} | {2 * rows * total / t['native'] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
