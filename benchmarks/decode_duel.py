"""Batch-1 decode, frugallm configurations against llama.cpp, interleaved round by round in one process.

Every runner is loaded once; each round times one generation per runner in turn, so machine noise hits
all of them alike. Prints the median decode tok/s (1 / TPOT) per runner and its ratio to llama.cpp.

    python benchmarks/decode_duel.py --threads 2 --rounds 7 --configs "int4:group=32:head=8,int4:group=32,none"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

PROMPT = "The history of computing begins with"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gen", type=int, default=64, help="decode tokens per run")
    ap.add_argument("--configs", default="int4:group=32:head=8,int4:group=32,none",
                    help="comma-separated frugallm --quant specs ('none': the unquantized default, 'fp32': float32, "
                         "'bf16': bfloat16 weights)")
    args = ap.parse_args()

    import torch

    from frugallm.lab.peers import make_runner

    torch.set_num_threads(args.threads)
    runners = {}
    for spec in args.configs.split(","):
        q = None if spec in ("none", "fp32", "bf16") else spec
        dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(spec, "auto")
        runners[f"frugallm {spec}"] = make_runner("frugallm", args.model, dtype=dtype, threads=args.threads, quant=q)
    try:
        runners["llama.cpp"] = make_runner("llama.cpp", args.model, threads=args.threads)
    except Exception as e:  # optional peer
        print(f"llama.cpp unavailable: {e}", file=sys.stderr)
    ids = next(iter(runners.values())).tokenizer.encode(PROMPT)
    for r in runners.values():
        r.generate([ids], 8)  # warm-up
    tps: dict[str, list[float]] = {name: [] for name in runners}
    load0 = os.getloadavg()
    for _ in range(args.rounds):
        for name, r in runners.items():
            req = r.generate([ids], args.gen).requests[0]
            tps[name].append(1.0 / req.tpot_s)
    med = {name: statistics.median(v) for name, v in tps.items()}
    ref = med.get("llama.cpp")
    print(f"model {args.model}, {args.threads} threads, {args.rounds} rounds x {args.gen} tokens, "
          f"load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| runner | decode tok/s (median) | min | max | x llama.cpp |")
    print("|---|---:|---:|---:|---:|")
    for name, v in tps.items():
        ratio = f"{med[name] / ref:.2f}" if ref else "-"
        print(f"| {name} | {med[name]:.1f} | {min(v):.1f} | {max(v):.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
