"""Decode speed with fp32 last-token logits (``Transformer.logits``) against the half-precision head it replaced.

Greedy decoding of one prompt, alternating ``model.fp32_logits`` True / False on the same loaded model, so both
see the same machine state; prints medians of decode tokens/s and their ratio, the CPU and the load average.

    python benchmarks/fp32_logits.py --model default --tokens 64 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from frugallm import LLM, SamplingParams, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, device="cpu")
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompt = "The history of the city begins"
    llm.generate(prompt, params)  # warm-up: packing, plans
    speed: dict[bool, list[float]] = {True: [], False: []}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for fp32 in (True, False):
            llm.model.fp32_logits = fp32
            out = llm.generate(prompt, params)[0]
            speed[fp32].append((len(out.token_ids) - 1) / (out.metrics["e2e_s"] - out.metrics["ttft_s"]))
        load.append(os.getloadavg()[0])
    new, old = statistics.median(speed[True]), statistics.median(speed[False])
    print(f"CPU: {cpu.model_name()} | threads {torch.get_num_threads()} | model {args.model} ({llm.weights}, "
          f"decode {llm.model.decode_dtype or llm.dtype}) | load average {min(load):.2f}-{max(load):.2f}")
    print("| head | decode tok/s (median) |")
    print("|---|---:|")
    print(f"| half output (before) | {old:.1f} |")
    print(f"| fp32 logits (now) | {new:.1f} |")
    print(f"ratio now / before: {new / old:.3f}")


if __name__ == "__main__":
    main()
