"""Decode speed while other processes keep the cores busy: the adaptive thread count vs a fixed one.

Each run is a fresh process (``LLM(model)`` at torch's default thread count, greedy, ``--tokens`` tokens after a
warm-up) with ``FRUGALLM_ADAPTIVE_THREADS`` 1 (governor on, the default) or 0 (fixed); ``hogs`` busy-looping
processes run beside it. Runs alternate on/off, medians reported; the load average is printed with each row.

    .venv/bin/python benchmarks/contention.py [--model default] [--hogs 0 2 4] [--runs 3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, torch
from frugallm import LLM, SamplingParams
llm = LLM(sys.argv[1])
p = SamplingParams(max_tokens=int(sys.argv[2]), temperature=0, ignore_eos=True)
llm.generate("Tell me about the sea.", SamplingParams(max_tokens=8, temperature=0))
out = llm.generate("Write a long story about ships, harbours and the people who sail.", p)[0]
gov = llm.governor
print(json.dumps({"tok_s": 1 / out.metrics["tpot_s"], "threads_end": torch.get_num_threads(),
                  "switches": gov.switches if gov else 0}))
"""


def hog() -> None:
    x = 0
    while True:
        x += 1


def run(model: str, tokens: int, adaptive: bool) -> dict:
    env = {**os.environ, "FRUGALLM_ADAPTIVE_THREADS": "1" if adaptive else "0"}
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(tokens)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--hogs", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    from frugallm.cpu import model_name

    print(f"CPU: {model_name()}, {os.cpu_count()} cores; model {args.model}; {args.tokens} tokens; load average "
          f"{os.getloadavg()[0]:.1f} before")
    for n in args.hogs:
        procs = [mp.Process(target=hog, daemon=True) for _ in range(n)]
        for p in procs:
            p.start()
        try:
            rows: dict[bool, list[dict]] = {True: [], False: []}
            for _ in range(args.runs):
                for adaptive in (False, True):
                    rows[adaptive].append(run(args.model, args.tokens, adaptive))
        finally:
            for p in procs:
                p.terminate()
        fixed = statistics.median(r["tok_s"] for r in rows[False])
        adapt = statistics.median(r["tok_s"] for r in rows[True])
        print(f"hogs {n}: fixed {fixed:6.1f} tok/s  adaptive {adapt:6.1f} tok/s  x{adapt / fixed:.2f}  "
              f"(adaptive ended at {[r['threads_end'] for r in rows[True]]} threads, switches "
              f"{[r['switches'] for r in rows[True]]}; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
