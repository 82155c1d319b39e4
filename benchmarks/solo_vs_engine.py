"""One stream, two loops: `LLM`'s contiguous-cache loop (`SoloRunner`) against the paged engine (`LLMEngine.step`).

The question behind it (issue 15): can single-prompt ``LLM.generate`` run through the engine's one loop without
losing speed? It now does (``LLM._on_engine``, the decode steps on ``PagedKVCache.bind_run``); this keeps the
contiguous loop, which KV policies and speculation still use, as the reference. One model, loaded once; each
round generates the same greedy prompt through both loops in turn
(order alternating), so machine noise hits both alike. Prints median TTFT and decode tok/s (1 / TPOT) per loop,
the engine/solo ratio and the engine's extra time per decode step, and whether both loops produced the same tokens.
A tiny model (``--model DIR`` of ``tests/fixtures/tiny_models.make_hf_model``) shows the loops' per-step cost.

    .venv/bin/python benchmarks/solo_vs_engine.py [--model default] [--dtype auto] [--rounds 7] [--gen 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys

PROMPT = "The history of computing begins with"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gen", type=int, default=128, help="decode tokens per run")
    ap.add_argument("--prompt-repeat", type=int, default=1, help="repeat the prompt text this many times")
    args = ap.parse_args()

    from frugallm import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, threads=args.threads)
    params = SamplingParams(max_tokens=args.gen, temperature=0, ignore_eos=True)
    ids = llm.tokenizer.encode(" ".join([PROMPT] * args.prompt_repeat))

    def solo() -> object:
        (seq,) = llm._sequences([ids], params)
        for _ in llm._run([seq]):  # SoloRunner's contiguous-cache loop
            pass
        return llm._output(seq)

    def engine() -> object:
        return llm.generate([ids], params)[0]  # one prompt: LLMEngine.step (LLM._on_engine)

    runners = {"solo": solo, "engine": engine}
    for run in runners.values():  # warm-up (kernels, rope tables, allocator)
        run()
    ttft: dict[str, list[float]] = {k: [] for k in runners}
    tok_s: dict[str, list[float]] = {k: [] for k in runners}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
            out = runners[name]()
            ttft[name].append(out.metrics["ttft_s"])
            tok_s[name].append(1.0 / out.metrics["tpot_s"])
            tokens[name] = out.token_ids
    print(f"model {args.model} | weights {llm.weights} | dtype {llm.dtype} | prompt {len(ids)} tokens | "
          f"gen {args.gen} | rounds {args.rounds}")
    print("| loop | TTFT ms (median) | decode tok/s (median) |")
    print("|---|---|---|")
    for name in runners:
        print(f"| {name} | {1000 * statistics.median(ttft[name]):.1f} | {statistics.median(tok_s[name]):.1f} |")
    ratio = statistics.median(tok_s["engine"]) / statistics.median(tok_s["solo"])
    extra_ms = 1000 * (1 / statistics.median(tok_s["engine"]) - 1 / statistics.median(tok_s["solo"]))
    print(f"engine / solo decode: {ratio:.3f}x ({extra_ms:+.2f} ms per decode step) | "
          f"same tokens: {tokens['solo'] == tokens['engine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
