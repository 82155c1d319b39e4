"""Decode attention over the paged KV pool: the fused CPU kernel vs gather + SDPA (kernel time only).

One layer of SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64, 16-token blocks
scattered in the pool), ``--batch`` sequences of ``--context`` tokens, one new query token each. Reports
the median microseconds per call of:

* ``gather+sdpa fp32``: the torch path on an fp32 pool (``index_select`` of each row's blocks, then SDPA);
* ``gather+sdpa bf16->fp32``: the same on a bf16 pool, upcast before SDPA (half SDPA is slower still);
* ``kernel fp32`` / ``kernel bf16``: ``torch.ops.frugallm.paged_decode_attention`` on the pool in place.

Each timed call reads a different copy of the pool (as many copies as it takes to pass 64 MiB, at most
30, one per layer of the model), so the keys and values come from DRAM as in a real decode step, not
from the L3 cache a single repeated call would leave them in.

    python benchmarks/attention_kernels.py --threads 2 --batch 1 16 64 --context 256 1024
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from frugallm import native


def median_us(fn, rounds: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


HQ, HK, D, BS = 9, 3, 64, 16


def measure(b: int, ctx: int, rounds: int) -> list[float]:
    """Median us of: gather+sdpa on fp32 and bf16 pools, the kernel on fp32 and bf16 pools."""
    nb = -(-ctx // BS)
    num_blocks = b * nb + 8
    tables = torch.randperm(num_blocks)[: b * nb].view(b, nb).contiguous()
    lens = torch.full((b,), ctx)
    mask = torch.zeros(b, 1, 1, nb * BS)
    mask[..., ctx:] = float("-inf")
    q = torch.randn(b, HQ, D)
    layer_bytes = 2 * num_blocks * BS * HK * D * 4
    copies = max(1, min(30, -(-(64 << 20) // layer_bytes)))
    pools = {dt: [(torch.randn(num_blocks, BS, HK, D).to(dt), torch.randn(num_blocks, BS, HK, D).to(dt))
                  for _ in range(copies)] for dt in (torch.float32, torch.bfloat16)}
    turn = itertools.count()

    def pool(dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return pools[dt][next(turn) % copies]

    def gather_sdpa(dt: torch.dtype) -> torch.Tensor:
        kp, vp = pool(dt)
        k = kp.index_select(0, tables.view(-1)).view(b, -1, HK, D).transpose(1, 2).float()
        v = vp.index_select(0, tables.view(-1)).view(b, -1, HK, D).transpose(1, 2).float()
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)

    def kernel(dt: torch.dtype) -> torch.Tensor:
        return torch.ops.frugallm.paged_decode_attention(q, *pool(dt), tables, lens, D**-0.5)

    dts = (torch.float32, torch.bfloat16)
    return [median_us(lambda fn=fn, dt=dt: fn(dt), rounds) for fn in (gather_sdpa, kernel) for dt in dts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--context", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not native.load("paged_attention"):
        raise SystemExit("the native kernel did not build here (see the warning above)")
    print(f"torch {torch.__version__}, {args.threads} threads; us per layer call (median of {args.rounds})")
    print("| batch | context | gather+sdpa fp32 | gather+sdpa bf16->fp32 | kernel fp32 | kernel bf16 | speed-up bf16 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batch:
        for ctx in args.context:
            r = measure(b, ctx, args.rounds)
            print(f"| {b} | {ctx} | {r[0]:.0f} | {r[1]:.0f} | {r[2]:.0f} | {r[3]:.0f} | {r[0] / r[3]:.2f}x |")


if __name__ == "__main__":
    main()
