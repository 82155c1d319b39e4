"""Perplexity through the decode path: teacher-forced one-token steps, with and without the native kernels.

`frugallm eval` scores whole windows in one prefill pass, which never runs the decode kernels (the native
bf16/int8/mix4 linears serve passes of few rows; the fused attention serves the batching engine). This
feeds each window one token at a time through the model's decode path (the `DecodePlan`, a contiguous
cache) and scores every next token, once per configuration with the native kernels on and once with
`FRUGALLM_NATIVE=0` (each run in its own process, since the choice is made when a library loads).

    python benchmarks/decode_quality.py --configs "bf16,int8,mix4:group=32" --windows 4 --window-len 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys


def score(spec: str, windows: int, window_len: int, threads: int) -> dict[str, float]:
    import torch

    from frugallm import LLM
    from frugallm.corpus import load_corpus

    torch.set_num_threads(threads)
    quant = None if spec in ("bf16", "fp32") else spec
    llm = LLM("default", dtype="float32" if spec == "fp32" else "bfloat16", quant=quant)
    ids = llm.tokenizer.encode(load_corpus("builtin")[:200_000])
    nll, n = 0.0, 0
    with torch.inference_mode():
        for w in range(windows):
            window = ids[w * window_len : (w + 1) * window_len]
            cache = llm.make_cache(1, window_len)
            for t in range(window_len - 1):
                logits = llm.model(torch.tensor([[window[t]]]), torch.tensor([[t]]), cache, "last")[0].float()
                nll -= torch.log_softmax(logits, -1)[window[t + 1]].item()
                n += 1
    return {"ppl": math.exp(nll / n), "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="bf16,int8,mix4:group=32")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(score(args.child, args.windows, args.window_len, args.threads)))
        return
    print("| config | native kernels | torch kernels (`FRUGALLM_NATIVE=0`) | difference |")
    print("|---|---:|---:|---:|")
    for spec in args.configs.split(","):
        ppl = {}
        for native in ("1", "0"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", spec, "--windows", str(args.windows), "--window-len",
                 str(args.window_len), "--threads", str(args.threads)],
                env={**os.environ, "FRUGALLM_NATIVE": native}, capture_output=True, text=True, check=True,
            )
            ppl[native] = json.loads(out.stdout.strip().splitlines()[-1])["ppl"]
        print(f"| {spec} | {ppl['1']:.4f} | {ppl['0']:.4f} | {100 * (ppl['1'] / ppl['0'] - 1):+.2f} % |")


if __name__ == "__main__":
    main()
