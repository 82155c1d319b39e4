"""How the cost of a GGUF-as-stored forward grows with its rows (issue 14's verify pass, batched serving).

``kernel``: per format, ``torch.ops.frugallm.gguf_linear`` on r input rows against a random weight of raw blocks,
median µs and time(r) / time(1), beside dequantize-then-GEMM (``gguf_dequantize`` + ``F.linear``, the path above
``kernels.NATIVE_QUANT_MAX_ROWS`` rows) and its ratio to the kernel (< 1: the GEMM path is faster at that r), and
for Q4_K and Q6_K the interleaved layout GGUFLinear runs for segments of 16k rows (``gguf_x16_linear``): ``x16 µs`` and
``kern/x16``, its speedup over the stored-block kernel. ``--q8`` adds the int8-activation kernels (``weights=
"stored-q8"``): ``gguf_linear_q8`` on the stored blocks (``q8 µs``) and, for Q4_K / Q6_K, ``gguf_x16_linear_q8`` on the
x16 layout (``x16q8 µs``, its ``x r=1`` and ``q8/x16q8``).
Run it once per ISA level: ``FRUGALLM_ISA=avx2`` forces the AVX2 build on an AVX-512 machine.

``--compare-src FILE`` (both sweeps): another version of ``csrc/gguf_x16.cpp`` (``git show REV:src/frugallm/csrc/
gguf_x16.cpp > /tmp/old.cpp``) built under its own op namespace with the same flags (``gguf_kernels.build_compare``)
and timed in the same process, interleaved with the current one: ``kernel`` adds its x16 (and x16q8) µs and
``old/new``, each pair timed on its own (the other columns' order leaves the weights in cache or not); ``model``
runs each r-row pass with either build's x16 ops (``ms old``, ``old/new``), a before/after of whole passes on one
noisy machine.

``model``: a whole-model target pass of r rows after a prompt (as ``spec_bench.py``'s ``verify`` section), median ms and
its ratio to one decode step (``--weights stored-q8``: the int8-activation kernels), and where the time goes
(torch.profiler, self CPU time): the GGUF kernels (``frugallm::gguf_linear``, ``gguf_x16_linear``), dequantize-then-GEMM
(``frugallm::gguf_dequantize`` + GEMMs) and everything else.

    .venv/bin/python benchmarks/gguf_rows.py kernel [--shape 1536x1536 8960x1536] [--threads 1 2]
        [--rows 1 2 4 5 8 9 16 32] [--types Q4_K Q6_K Q8_0] [--dtype float32 bfloat16] [--q8]
    FRUGALLM_ISA=avx2 .venv/bin/python benchmarks/gguf_rows.py kernel
    .venv/bin/python benchmarks/gguf_rows.py model [--model qwen2.5-coder-1.5b] [--threads 2] [--profile]
        [--weights stored-q8] [--compare-src /tmp/old.cpp]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from frugallm import cpu, native
from frugallm.quant.gguf_linear import Q8_TYPES
from frugallm.quant.gguf_x16 import X16_Q8_TYPES, X16_TYPES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from gguf_blocks import random_blocks  # noqa: E402  (shared with the kernel tests)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_kernels import build_compare, median_us  # noqa: E402  (interleaved medians, one definition)

X16_OPS = ("gguf_x16_linear", "gguf_x16_linear_q8", "gguf_q4k_x16_linear")  # what --compare-src swaps


def dequantize_then_gemm(x: torch.Tensor, raw: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """What GGUFLinear runs above the row cap: the weight dequantized in x's dtype, then one GEMM."""
    return F.linear(x, torch.ops.frugallm.gguf_dequantize(raw, qtype, k, x.dtype))


def header(threads: int) -> str:
    fl = cpu.flags()
    simd = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni") if f in fl)
    return (f"CPU: {cpu.model_name()} ({simd}); ISA level {cpu.level()}; threads {threads}; "
            f"torch {torch.__version__}")


@torch.no_grad()
def kernel_sweep(args: argparse.Namespace) -> None:
    assert native.usable("gguf_linear"), "native gguf_linear kernel unavailable on this machine"
    cmp_ops = build_compare(args.compare_src) if args.compare_src else None
    q8 = args.q8 and native.usable("gguf_q8")
    if args.q8 and not q8:
        print("gguf_q8 kernel unavailable on this machine: no q8 columns", file=sys.stderr)
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(header(threads))
        print(f"{'type':<6}{'shape':>12}{'x':>9}{'rows':>5}{'µs':>10}{'x r=1':>7}{'deq+mm µs':>11}{'deq/kern':>9}"
              f"{'x16 µs':>9}{'kern/x16':>9}"
              + (f"{'q8 µs':>9}{'x16q8 µs':>10}{'x r=1':>7}{'q8/x16q8':>9}" if q8 else "")
              + (f"{'old x16':>9}{'old/new':>8}" + (f"{'old x16q8':>10}{'old/new':>8}" if q8 else "")
                 if cmp_ops is not None else ""))
        for shape in args.shape:
            n, k = (int(v) for v in shape.lower().split("x"))
            for name in args.types:
                qtype = int(T[name])
                raw = torch.from_numpy(random_blocks(T[name], n, k))
                x16 = (X16_TYPES[T[name]][0](raw)
                       if T[name] in X16_TYPES and n % 16 == 0 and native.usable("gguf_x16") else None)
                for dname in args.dtype:
                    dtype = getattr(torch, dname)
                    base = base8 = None
                    for rows in args.rows:
                        x = torch.randn(rows, k).to(dtype)
                        fns = {"kern": partial(torch.ops.frugallm.gguf_linear, x, raw, qtype, n, None),
                               "deq": partial(dequantize_then_gemm, x, raw, qtype, k)}
                        if x16 is not None:
                            fns["x16"] = partial(torch.ops.frugallm.gguf_x16_linear, x, x16, qtype, n, None)
                        if q8 and T[name] in Q8_TYPES:
                            fns["q8"] = partial(torch.ops.frugallm.gguf_linear_q8, x, raw, qtype, n, None)
                        if q8 and x16 is not None and T[name] in X16_Q8_TYPES:
                            fns["x16q8"] = partial(torch.ops.frugallm.gguf_x16_linear_q8, x, x16, qtype, n, None)
                        us = median_us(fns, args.reps)
                        if cmp_ops is not None and x16 is not None:  # pairs timed alone: same cache state for both
                            us |= median_us({"new": fns["x16"], "old": partial(cmp_ops.gguf_x16_linear, x, x16, qtype,
                                                                               n, None)}, args.reps)
                            if "x16q8" in fns:
                                pair = {"newq8": fns["x16q8"],
                                        "oldq8": partial(cmp_ops.gguf_x16_linear_q8, x, x16, qtype, n, None)}
                                us |= median_us(pair, args.reps)
                        base = base or us["kern"]
                        x16_cols = (f"{us['x16']:>9.1f}{us['kern'] / us['x16']:>9.2f}" if "x16" in us
                                    else f"{'-':>9}{'-':>9}")
                        q8_cols = ""
                        if q8:
                            q8_cols = f"{us['q8']:>9.1f}" if "q8" in us else f"{'-':>9}"
                            if "x16q8" in us:
                                base8 = base8 or us["x16q8"]
                                q8_cols += f"{us['x16q8']:>10.1f}{us['x16q8'] / base8:>7.2f}"
                                q8_cols += f"{us['q8'] / us['x16q8']:>9.2f}" if "q8" in us else f"{'-':>9}"
                            else:
                                q8_cols += f"{'-':>10}{'-':>7}{'-':>9}"
                        cmp_cols = ""
                        if cmp_ops is not None:
                            cmp_cols = (f"{us['old']:>9.1f}{us['old'] / us['new']:>8.2f}" if "old" in us
                                        else f"{'-':>9}{'-':>8}")
                            if q8:
                                cmp_cols += (f"{us['oldq8']:>10.1f}{us['oldq8'] / us['newq8']:>8.2f}" if "oldq8" in us
                                             else f"{'-':>10}{'-':>8}")
                        print(f"{name:<6}{shape:>12}{dname:>9}{rows:>5}{us['kern']:>10.1f}{us['kern'] / base:>7.2f}"
                              f"{us['deq']:>11.1f}{us['deq'] / us['kern']:>9.2f}{x16_cols}{q8_cols}{cmp_cols}",
                              flush=True)


@torch.inference_mode()
def model_sweep(args: argparse.Namespace) -> None:
    from frugallm import LLM

    torch.set_num_threads(args.threads[0])
    print(header(args.threads[0]) + f"; weights {args.weights}")
    use_old = [False]
    if args.compare_src:  # GGUFLinear's x16 ops through a switch, set before the model builds its decode plans
        from frugallm.quant.gguf_linear import GGUFLinear

        cmp_ops, current = build_compare(args.compare_src), GGUFLinear._op

        def switched(self: GGUFLinear, seg: object) -> object:
            op = current(self, seg)
            name = next((n for n in X16_OPS if op is getattr(torch.ops.frugallm, n)), None)
            if name is None:
                return op
            old = getattr(cmp_ops, name)
            return lambda *a: (old if use_old[0] else op)(*a)

        GGUFLinear._op = switched  # type: ignore[method-assign]
    llm = LLM(args.model, weights=args.weights)
    ids = llm.tokenizer.encode("def add(a, b):\n    return a + b\n\n# a test for it\n" * 8)
    n = len(ids)
    cache = llm.make_cache(1, n + max(args.rows) + 8)
    llm.model(torch.tensor([ids]), torch.arange(n)[None], cache, "last")
    base = None
    print(f"{'rows':>4}{'ms':>9}{'x r=1':>7}" + (f"{'ms old':>9}{'x r=1':>7}{'old/new':>8}" if args.compare_src else "")
          + "   share of self CPU time (profiled pass)")
    base_old = None
    for r in args.rows:
        x, pos = torch.tensor([ids[-r:]]), torch.arange(n, n + r)[None]
        logits = "all" if r > 1 else "last"
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.reps):
            for old in (False, True) if args.compare_src else (False,):  # interleaved: noise hits both alike
                use_old[0] = old
                cache.truncate(n)
                if r == 1:  # a one-row step after a multi-row pass rebuilds the decode plan: warm it
                    llm.model(x, pos, cache, logits)
                    cache.truncate(n)
                t0 = time.perf_counter()
                llm.model(x, pos, cache, logits)
                times[old].append(time.perf_counter() - t0)
        use_old[0] = False
        t = statistics.median(times[False])
        base = base or t
        line = f"{r:>4}{t * 1e3:>9.1f}{t / base:>7.2f}"
        if args.compare_src:
            t_old = statistics.median(times[True])
            base_old = base_old or t_old
            line += f"{t_old * 1e3:>9.1f}{t_old / base_old:>7.2f}{t_old / t:>8.2f}"
        if args.profile:
            cache.truncate(n)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                llm.model(x, pos, cache, logits)
            groups: dict[str, float] = defaultdict(float)
            others: dict[str, float] = defaultdict(float)
            for ev in prof.key_averages():
                key = ("gguf kernel" if ev.key in ("frugallm::gguf_linear", "frugallm::gguf_x16_linear",
                                                   "frugallm::gguf_linear_q8", "frugallm::gguf_x16_linear_q8",
                                                   "frugallm::gguf_x16_b32_linear") else
                       "gguf dequantize" if ev.key in ("frugallm::gguf_dequantize", "frugallm::gguf_q4k_x16_unpack",
                                                    "frugallm::gguf_q6k_x16_unpack", "frugallm::gguf_x16_b32_unpack")
                       else
                       "GEMM" if ev.key in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm")
                       else "other")
                groups[key] += ev.self_cpu_time_total
                if key == "other":
                    others[ev.key] += ev.self_cpu_time_total
            total = sum(groups.values()) or 1.0
            line += "   " + "  ".join(f"{g} {v / total:.0%}" for g, v in sorted(groups.items(), key=lambda kv: -kv[1]))
            top = sorted(others.items(), key=lambda kv: -kv[1])[:4]
            line += "   (other: " + ", ".join(f"{name} {v / total:.0%}" for name, v in top) + ")"
        cache.truncate(n)
        print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["kernel", "model"])
    ap.add_argument("--shape", nargs="*", default=["1536x1536", "8960x1536"], help="N x K (out x in features)")
    ap.add_argument("--types", nargs="*", default=["Q4_K", "Q6_K", "Q8_0", "Q4_0"])
    ap.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"], help="activation dtypes (kernel)")
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 5, 8, 9, 16, 32])
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="model of the `model` sweep")
    ap.add_argument("--profile", action="store_true", help="model: split each pass's time by op (torch.profiler)")
    ap.add_argument("--q8", action="store_true", help="kernel: also the int8-activation kernels (stored-q8)")
    ap.add_argument("--weights", default="auto", help="model: LLM(weights=...), e.g. stored-q8")
    ap.add_argument("--compare-src", type=Path, help="another csrc/gguf_x16.cpp to time alongside (before/after)")
    args = ap.parse_args()
    if args.what == "kernel":
        kernel_sweep(args)
    else:
        args.reps = min(args.reps, 7)
        model_sweep(args)


if __name__ == "__main__":
    main()
