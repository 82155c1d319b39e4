"""Structured-output overhead at concurrency 16: the same prompts with and without a JSON schema, same run.

The constrained run goes first; the unconstrained run then generates exactly as many tokens per sequence
(``max_tokens`` = that length, ``ignore_eos``), so both have the same batch profile and the ratio isolates the
cost of the masks (compile, per-step fill, applying them). Alternating rounds, medians. The time spent in the
masks themselves (``LLMEngine._constrain`` and ``InputProcessor.compile``) is also timed directly: on a loaded
machine the wall-clock ratio is noisy, the masks' share of the constrained run is not.

    .venv/bin/python benchmarks/structured_bench.py [--model default] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))

from frugallm import LLM, SamplingParams  # noqa: E402
from frugallm.cpu import model_name  # noqa: E402
from frugallm.engine.batched import generate_batched  # noqa: E402
from frugallm.engine.inputs import InputProcessor  # noqa: E402
from frugallm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from structured_schemas import SCHEMAS  # noqa: E402

MASK_S = [0.0]


def timed(fn):  # noqa: ANN001, ANN201
    def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            MASK_S[0] += time.perf_counter() - t

    return wrapper


LLMEngine._constrain = staticmethod(timed(LLMEngine._constrain))  # type: ignore[method-assign]
InputProcessor.compile = timed(InputProcessor.compile)  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    llm = LLM(args.model)
    c = args.concurrency
    schemas = [SCHEMAS[i % len(SCHEMAS)][0] for i in range(c)]
    prompts = [llm.tokenizer.encode(llm.chat_prompt([{"role": "user", "content": "Reply with JSON for this schema: "
                                                     + json.dumps(s)}]), add_special_tokens=True) for s in schemas]
    cfg = EngineConfig(max_num_seqs=c, max_num_batched_tokens=max(512, c), num_blocks=2048)
    load0 = os.getloadavg()
    print(f"# {model_name()}; model {args.model}; concurrency {c}; load average {load0}")
    constrained = [SamplingParams(max_tokens=160, temperature=0, json_schema=s) for s in schemas]
    generate_batched(llm, prompts[:2], constrained[:2], cfg)  # warm-up (and the backend's vocabulary setup)
    with_s, without_s, mask_s, lens = [], [], [], []
    for _ in range(args.rounds):
        MASK_S[0] = 0.0
        t = time.perf_counter()
        outs = generate_batched(llm, prompts, constrained, cfg)
        with_s.append(time.perf_counter() - t)
        mask_s.append(MASK_S[0])
        lens = [len(o.token_ids) for o in outs]
        free = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lens]
        t = time.perf_counter()
        generate_batched(llm, prompts, free, cfg)
        without_s.append(time.perf_counter() - t)
    ok = 0
    for o in outs:
        try:
            json.loads(o.text)
            ok += 1
        except ValueError:
            pass
    tokens = sum(lens)
    w, wo = statistics.median(with_s), statistics.median(without_s)
    print(f"generated tokens per round: {tokens} (per sequence {min(lens)}..{max(lens)}); {ok}/{c} outputs parse")
    print(f"with schema:    {tokens / w:7.1f} tok/s (median {w:.2f} s of {with_s})")
    print(f"without schema: {tokens / wo:7.1f} tok/s (median {wo:.2f} s of {without_s})")
    m = statistics.median(mask_s)
    print(f"overhead: {(w / wo - 1) * 100:+.1f} % wall clock (target <= 10 %); masks + compiles {m * 1e3:.1f} ms "
          f"= {m / w * 100:.2f} % of the constrained run; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
