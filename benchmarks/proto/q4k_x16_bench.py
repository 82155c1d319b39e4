"""PROTOTYPE measurement: Q4_K with 16 weight rows interleaved so that vdpbf16ps lanes are output columns, vs the
shipped stored-block kernel (torch.ops.frugallm.gguf_linear), bf16 x, at r rows. Columns: ``x16`` (repacked, fp32
scales: +33 % memory), ``x16b`` (repacked in the file's own bytes: no extra memory), ``fly`` (the stored blocks,
interleaved on the fly with vpgatherdd: no repack, but gathers cost more than they save at few rows). Each is
checked against dequantize-then-matmul and for rows bit-identical to their one-row pass. Needs AVX512-BF16.

    .venv/bin/python benchmarks/proto/q4k_x16_bench.py [--shape 1536x1536] [--rows 1 2 4 5 8 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch

from frugallm import cpu, native
from frugallm.paths import cache_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
from gguf_blocks import random_blocks  # noqa: E402

SRC = Path(__file__).with_name("gguf_q4k_x16.cpp")
FLY = Path(__file__).with_name("gguf_q4k_fly.cpp")


def build(src: Path = SRC) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    out = cache_dir() / "native-proto"
    out.mkdir(parents=True, exist_ok=True)
    so = out / f"{src.stem}-{hashlib.sha256(src.read_bytes()).hexdigest()[:12]}.so"
    if not so.exists():
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        cmd = [native._compiler() or "c++", *native.CFLAGS, "-march=native", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               *(f"-I{p}" for p in include_paths()), str(src), *(f"-L{p}" for p in library_paths()), "-lc10",
               "-ltorch_cpu", "-o", str(so)]
        subprocess.run(cmd, check=True)
    torch.ops.load_library(str(so))


def repack_q4k_x16(raw: np.ndarray) -> np.ndarray:
    """Q4_K rows [N, nb * 144] -> the prototype's interleaved layout (see gguf_q4k_x16.cpp)."""
    n = raw.shape[0]
    b = raw.reshape(n, -1, 144)
    nb = b.shape[1]
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    s = b[..., 4:16].astype(np.int32)
    sc = np.empty((n, nb, 8), np.int32)
    mn = np.empty((n, nb, 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[..., j], mn[..., j] = s[..., j] & 63, s[..., j + 4] & 63
        else:
            sc[..., j] = (s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4)
            mn[..., j] = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
    scale = d[..., None] * sc.astype(np.float32)
    offset = dmin[..., None] * mn.astype(np.float32) + np.float32(128) * scale
    qs = b[..., 16:].astype(np.uint32)  # [n, nb, 128]
    v = np.arange(256)
    j = v // 32
    q = (qs[..., 32 * (j // 2) + v % 32] >> (4 * (j % 2))) & 0xF  # [n, nb, 256]
    q = q.reshape(n // 16, 16, nb, 8, 4, 4, 2)  # G, c, blk, j, z, r, s
    half = (q << (4 * np.arange(4, dtype=np.uint32))[:, None]).sum(axis=5)  # G, c, blk, j, z, s
    dword = (half[..., 0] | (half[..., 1] << 16)).astype(np.uint32)  # G, c, blk, j, z
    dword = dword.transpose(0, 2, 3, 4, 1)  # G, blk, j, z, c
    sc_g = scale.reshape(n // 16, 16, nb, 8).transpose(0, 2, 3, 1)  # G, blk, j, c
    of_g = offset.reshape(n // 16, 16, nb, 8).transpose(0, 2, 3, 1)
    parts = [np.ascontiguousarray(sc_g).view(np.uint8).reshape(n // 16, nb, 8, 64),
             np.ascontiguousarray(of_g).view(np.uint8).reshape(n // 16, nb, 8, 64),
             np.ascontiguousarray(dword).view(np.uint8).reshape(n // 16, nb, 8, 256)]
    return np.concatenate(parts, axis=3).reshape(n // 16, -1)


def repack_q4k_x16b(raw: np.ndarray) -> np.ndarray:
    """Q4_K rows [N, nb * 144] -> the same-size layout (gguf_q4k_x16b): per (16 rows, block) d, dmin, the scale bytes
    transposed, then the nibbles as in repack_q4k_x16."""
    n = raw.shape[0]
    b = raw.reshape(n // 16, 16, -1, 144)  # G, c, blk, byte
    nb = b.shape[2]
    head = b[..., :16].transpose(0, 2, 3, 1)  # G, blk, byte, c
    d = head[:, :, 0:2].transpose(0, 1, 3, 2).reshape(n // 16, nb, 32)  # c-major fp16 bytes
    dmin = head[:, :, 2:4].transpose(0, 1, 3, 2).reshape(n // 16, nb, 32)
    scales = head[:, :, 4:16].reshape(n // 16, nb, 192)  # [12][16]
    nibbles = repack_q4k_x16(raw).reshape(n // 16, nb, 8, 384)[..., 128:].reshape(n // 16, nb, 2048)
    return np.ascontiguousarray(np.concatenate([d, dmin, scales, nibbles], axis=2)).reshape(n // 16, -1)


def median_us(fns: dict, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(t) * 1e6 for k, t in times.items()}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1536x1536")
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 5, 8, 9, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert native.usable("gguf_linear") and "avx512_bf16" in cpu.flags()
    build()
    build(FLY)
    n, k = (int(v) for v in args.shape.split("x"))
    raw = random_blocks(gguf.GGMLQuantizationType.Q4_K, n, k, seed=1)
    packed = torch.from_numpy(repack_q4k_x16(raw))
    raw_t = torch.from_numpy(raw)
    w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)).double()
    x = torch.randn(max(args.rows), k).bfloat16()
    got = torch.ops.gguf_x16.gguf_q4k_x16(x, packed, n)
    ref = x.double() @ w.T
    bound = (x.double().abs() @ w.abs().T) * 1e-5 + ref.abs() * 2.0**-8
    assert ((got.double() - ref).abs() <= bound).all(), "prototype != dequantize-then-matmul"
    alone = torch.cat([torch.ops.gguf_x16.gguf_q4k_x16(x[i : i + 1], packed, n) for i in range(x.shape[0])])
    assert torch.equal(alone, got), "rows depend on the pass"
    same = torch.from_numpy(repack_q4k_x16b(raw))
    assert same.numel() == raw.size, "the same-size layout holds the file's bytes"
    got_b = torch.ops.gguf_x16.gguf_q4k_x16b(x, same, n)
    assert ((got_b.double() - ref).abs() <= bound).all(), "same-size prototype != dequantize-then-matmul"
    alone_b = torch.cat([torch.ops.gguf_x16.gguf_q4k_x16b(x[i : i + 1], same, n) for i in range(x.shape[0])])
    assert torch.equal(alone_b, got_b), "rows depend on the pass (same-size layout)"
    got_f = torch.ops.gguf_fly.gguf_q4k_fly(x, raw_t, n)
    assert ((got_f.double() - ref).abs() <= bound).all(), "as-stored prototype != dequantize-then-matmul"
    alone_f = torch.cat([torch.ops.gguf_fly.gguf_q4k_fly(x[i : i + 1], raw_t, n) for i in range(x.shape[0])])
    assert torch.equal(alone_f, got_f), "rows depend on the pass (as stored)"
    print(f"CPU {cpu.model_name()}, threads {args.threads}, Q4_K {n}x{k}, bf16 x; checks passed")
    print(f"{'rows':>4}{'stored µs':>11}{'x r=1':>7}{'x16 µs':>9}{'x r=1':>7}{'speedup':>9}"
          f"{'x16b µs':>9}{'x r=1':>7}{'speedup':>9}{'fly µs':>9}{'x r=1':>7}{'speedup':>9}")
    base = {}
    for r in args.rows:
        xr = x[:r].contiguous()
        us = median_us({"stored": partial(torch.ops.frugallm.gguf_linear, xr, raw_t, 12, n, None),
                        "x16": partial(torch.ops.gguf_x16.gguf_q4k_x16, xr, packed, n),
                        "x16b": partial(torch.ops.gguf_x16.gguf_q4k_x16b, xr, same, n),
                        "fly": partial(torch.ops.gguf_fly.gguf_q4k_fly, xr, raw_t, n)}, args.reps)
        base = base or us
        print(f"{r:>4}{us['stored']:>11.1f}{us['stored'] / base['stored']:>7.2f}{us['x16']:>9.1f}"
              f"{us['x16'] / base['x16']:>7.2f}{us['stored'] / us['x16']:>9.2f}{us['x16b']:>9.1f}"
              f"{us['x16b'] / base['x16b']:>7.2f}{us['stored'] / us['x16b']:>9.2f}{us['fly']:>9.1f}"
              f"{us['fly'] / base['fly']:>7.2f}{us['stored'] / us['fly']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
