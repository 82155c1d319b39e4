"""Micro-benchmark: torch.ops.frugallm.gguf_linear (decode GEMV on raw GGUF blocks) per format.

For each format a random weight [N, K] of raw blocks (random codes, small fp16 scales) is applied to ``--rows``
input rows; the table gives the median of ``--reps`` calls (after a warm-up), the weight bandwidth that implies
(stored bytes / time), and the same product as a dense fp32 ``F.linear`` on the dequantized weight and as torch
dequantize-then-matmul (``gguf_dequantize`` + ``F.linear``, what prefill does). CPU, threads and the ISA level the
kernel was built for (``frugallm.cpu.level()``, capped by ``FRUGALLM_ISA``) head the table.

``--q8`` also times ``torch.ops.frugallm.gguf_linear_q8`` (``csrc/gguf_q8.cpp``: activations quantized to int8
per 32 values, llama.cpp's arithmetic, ``weights="stored-q8"``) interleaved with the exact kernel, for the formats it
runs: its µs, its weight bandwidth and its speedup over the exact kernel.

``--compare-src FILE`` also builds another version of ``csrc/gguf_linear.cpp`` (say ``git show
HEAD~1:src/frugallm/csrc/gguf_linear.cpp > /tmp/old.cpp``) under its own op namespace with the same flags and
times it in the same process, interleaved with the current kernel: a before/after on one noisy machine.

    .venv/bin/python benchmarks/gguf_kernels.py [--shape 1536x1536] [--rows 1] [--threads 1] [--reps 200]
        [--types Q4_K Q6_K] [--compare-src /tmp/old.cpp] [--q8]
    .venv/bin/python benchmarks/gguf_kernels.py --shape 1536x8960 --rows 1 4 --threads 1 --types Q4_K Q6_K --q8
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from frugallm import cpu, native
from frugallm.paths import cache_dir
from frugallm.quant.gguf_linear import Q8_TYPES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from gguf_blocks import F16_FIELDS, random_blocks  # noqa: E402  (shared with the kernel tests)


def build_compare(src: Path) -> object:
    """Builds ``src`` with its ops under ``torch.ops.gguf_cmp`` (same compiler flags as frugallm.native)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    text = src.read_text().replace("TORCH_LIBRARY_FRAGMENT(frugallm,", "TORCH_LIBRARY_FRAGMENT(gguf_cmp,")
    text = text.replace("TORCH_LIBRARY_IMPL(frugallm,", "TORCH_LIBRARY_IMPL(gguf_cmp,")
    for header in native.CSRC.glob("*.h"):  # the csrc headers by absolute path (the copy lives elsewhere)
        text = text.replace(f'#include "{header.name}"', f'#include "{header}"')
    key = hashlib.sha256((text + cpu.level()).encode()).hexdigest()[:12]
    out_dir = cache_dir() / "native-compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    cpp, so = out_dir / f"gguf_cmp-{key}.cpp", out_dir / f"gguf_cmp-{cpu.level()}-{key}.so"
    if not so.exists():
        cpp.write_text(text)
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        cmd = [native._compiler() or "c++", *native.CFLAGS, *cpu.compile_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               *(f"-I{p}" for p in include_paths()), str(cpp), *(f"-L{p}" for p in library_paths()), "-lc10",
               "-ltorch_cpu", "-o", str(so)]
        subprocess.run(cmd, check=True)
    torch.ops.load_library(str(so))
    return torch.ops.gguf_cmp


def median_us(fns: dict[str, object], reps: int) -> dict[str, float]:
    """Median µs of each callable, the callables interleaved rep by rep (noise hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1536x1536", help="N x K (out x in features), e.g. 8960x1536")
    ap.add_argument("--rows", type=int, nargs="*", default=[1], help="input rows (1 = batch-1 decode)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="activation dtype")
    ap.add_argument("--types", nargs="*", default=[t.name for t in F16_FIELDS])
    ap.add_argument("--compare-src", type=Path, help="another gguf_linear.cpp to time alongside (before/after)")
    ap.add_argument("--no-torch", action="store_true", help="skip the F.linear and dequantize+matmul columns")
    ap.add_argument("--q8", action="store_true", help="also time the int8-activation kernel (gguf_linear_q8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert native.usable("gguf_linear"), "native gguf_linear kernel unavailable on this machine"
    cmp_ops = build_compare(args.compare_src) if args.compare_src else None
    q8 = args.q8 and native.usable("gguf_q8")
    if args.q8 and not q8:
        print("gguf_q8 kernel unavailable on this machine: no q8 columns", file=sys.stderr)
    n, k = (int(v) for v in args.shape.lower().split("x"))
    dtype = getattr(torch, args.dtype)
    fl = cpu.flags()
    simd = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni") if f in fl)
    print(f"CPU: {cpu.model_name()} ({simd}); ISA level {cpu.level()}; threads {torch.get_num_threads()}; "
          f"x {args.dtype}; torch {torch.__version__}; reps {args.reps}"
          + (f"; q8 dot product {torch.ops.frugallm.gguf_q8_isa()}" if q8 else ""))
    head = f"{'type':<6}{'shape':>12}{'rows':>5}{'µs':>9}{'GB/s':>7}"
    if cmp_ops is not None:
        head += f"{'cmp µs':>9}{'speedup':>8}"
    if q8:
        head += f"{'q8 µs':>9}{'q8 GB/s':>8}{'x exact':>8}"
    if not args.no_torch:
        head += f"{'F.linear µs':>12}{'x':>6}{'deq+mm µs':>11}{'x':>6}"
    print(head)
    for name in args.types:
        qtype = T[name]
        raw = torch.from_numpy(random_blocks(qtype, n, k))
        w = torch.ops.frugallm.gguf_dequantize(raw, int(qtype), k, torch.float32)
        for rows in args.rows:
            x = torch.randn(rows, k).to(dtype)
            q = int(qtype)
            fns = {"gguf": lambda x=x, raw=raw, q=q: torch.ops.frugallm.gguf_linear(x, raw, q, n, None)}
            if cmp_ops is not None:
                fns["cmp"] = lambda x=x, raw=raw, q=q: cmp_ops.gguf_linear(x, raw, q, n, None)
            if q8 and qtype in Q8_TYPES:
                fns["q8"] = lambda x=x, raw=raw, q=q: torch.ops.frugallm.gguf_linear_q8(x, raw, q, n, None)
            if not args.no_torch:
                wx = w.to(dtype)
                fns["dense"] = lambda x=x, wx=wx: F.linear(x, wx)
                fns["deq"] = lambda x=x, raw=raw, q=q: F.linear(x, torch.ops.frugallm.gguf_dequantize(raw, q, k, dtype))
            with torch.no_grad():
                us = median_us(fns, args.reps)
            line = f"{name:<6}{f'{n}x{k}':>12}{rows:>5}{us['gguf']:>9.1f}{raw.numel() / us['gguf'] / 1e3:>7.2f}"
            if cmp_ops is not None:
                line += f"{us['cmp']:>9.1f}{us['cmp'] / us['gguf']:>8.2f}"
            if q8:
                line += (f"{us['q8']:>9.1f}{raw.numel() / us['q8'] / 1e3:>8.2f}{us['gguf'] / us['q8']:>8.2f}"
                         if "q8" in us else f"{'-':>9}{'-':>8}{'-':>8}")
            if not args.no_torch:
                line += f"{us['dense']:>12.1f}{us['dense'] / us['gguf']:>6.2f}{us['deq']:>11.1f}"
                line += f"{us['deq'] / us['gguf']:>6.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
