"""KV-cache policies on a real model: KV bytes, perplexity, top-1 agreement and decode speed.

For each spec the corpus window of ``--context`` tokens is split: the first ``context - tail`` tokens are
the prompt (prefilled, compressed by the policy; GemFilter first shortens it), the last ``--tail`` tokens
(default 256, at most half) are teacher-forced one token per step through the compressed cache, so every
prediction is made with the policy active; a long context then costs one prefill, not thousands of steps.

* KV bytes: ``cache.nbytes()`` (the cache's own storage) after prefill and at the end, as a fraction of
  an fp16 cache holding every token seen.
* PPL: perplexity of the tail; top-1: agreement of the argmax with the full cache's.
* prefill s (time to first token, GemFilter's selection included) and decode tok/s.

    python benchmarks/kv_bench.py                       # default model, 1k context
    python benchmarks/kv_bench.py --context 2048 --model path/to/model.gguf --threads 1
    python benchmarks/kv_bench.py --context 8192 --tail 128 --model qwen2.5-coder-0.5b
    python benchmarks/kv_bench.py --specs "full;snapkv:budget=0.1+kivi:bits=2"
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from frugallm import LLM
from frugallm.corpus import load_corpus
from frugallm.kv import build_kv_cache, parse_kv_spec, select_prompt_tokens

DEFAULT_SPECS = [
    "full",
    "kivi:bits=2",
    "kivi:bits=4",
    "kivi:bits=2,residual=0",
    "xquant:bits=2",
    "xquant:bits=4",
    "streamingllm:budget=0.25",
    "h2o:budget=0.25",
    "snapkv:budget=0.25",
    "lacache:budget=0.25",
    "think:ratio=0.5",
    "gemfilter:budget=0.25",
    "snapkv:budget=0.25+kivi:bits=2",
    "h2o:budget=0.25+kivi:bits=2",
    "snapkv:budget=0.25+think:ratio=0.5+kivi:bits=2",
]


@dataclass
class Run:
    spec: str
    logits: torch.Tensor  # [tail, vocab] predicting ids[-tail:]
    kv_prefill: int
    kv_end: int
    prefill_s: float
    decode_tok_s: float


@torch.inference_mode()
def run_spec(llm: LLM, spec: str, ids: list[int], tail: int) -> Run:
    model, dev = llm.model, llm.device
    start = len(ids) - tail  # the prompt's length
    t0 = time.perf_counter()
    prompt = select_prompt_tokens(spec, model, ids[:start]) or ids[:start]
    steps = len(ids) - 1 - start
    cache = build_kv_cache(spec, model, batch=1, capacity=len(prompt) + steps, dtype=llm.dtype, device=dev)
    n = len(prompt)
    out = [model(torch.tensor([prompt], device=dev), torch.arange(n, device=dev)[None], cache, "last")[0]]
    prefill_s = time.perf_counter() - t0
    kv_prefill = cache.nbytes()
    t1 = time.perf_counter()
    for i in range(start, len(ids) - 1):
        tok = torch.tensor([[ids[i]]], device=dev)
        out.append(model(tok, torch.tensor([[n + i - start]], device=dev), cache, "last")[0])
    decode_s = time.perf_counter() - t1
    return Run(spec, torch.stack(out).float(), kv_prefill, cache.nbytes(), prefill_s,
               steps / decode_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="'default', a .gguf file or a Hugging Face folder")
    ap.add_argument("--context", type=int, default=1024, help="tokens: prompt, then the teacher-forced tail")
    ap.add_argument("--tail", type=int, default=256, help="tokens teacher-forced one per step (at most half)")
    ap.add_argument("--specs", default=";".join(DEFAULT_SPECS),
                    help="';'-separated KV specs (the first should be full: it is the reference)")
    ap.add_argument("--corpus", default=None, help="UTF-8 text file (default: the built-in pydoc corpus)")
    ap.add_argument("--offset", type=int, default=20_000, help="character offset into the corpus")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [s.strip() for s in args.specs.split(";") if s.strip()]
    for s in specs:
        parse_kv_spec(s)  # fail fast on a bad spec
    llm = LLM(args.model, dtype=args.dtype, device="cpu")
    cfg = llm.config
    text = load_corpus(args.corpus)[args.offset:]
    ids = llm.tokenizer.encode(text[: 8 * args.context], add_special_tokens=False)[: args.context]
    if len(ids) < args.context:
        raise SystemExit(f"corpus too short for {args.context} tokens from offset {args.offset}")
    tail = max(1, min(args.tail, len(ids) // 2))
    start = len(ids) - tail
    target = torch.tensor(ids[start:])
    fp16_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    if specs[0] != "full":
        specs.insert(0, "full")
    runs = []
    for spec in specs:
        runs.append(run_spec(llm, spec, ids, tail))
        r = runs[-1]
        print(f"  {spec}: done ({r.decode_tok_s:.1f} tok/s)", flush=True)
    ref = runs[0]
    ref_ppl = F.cross_entropy(ref.logits, target).exp().item()
    print(f"\nKV policies on {cfg.name or args.model} ({cfg.num_layers} layers, {cfg.num_kv_heads} KV heads x "
          f"{cfg.head_dim}), dtype {llm.dtype}, {torch.get_num_threads()} thread(s); {len(ids)} tokens of "
          f"corpus: {start} prefilled, {len(ids) - 1 - start} teacher-forced through the cache.\n")
    print("| policy | KV after prefill (x fp16) | KV at end (x fp16) | KV at end | PPL | dPPL | top-1 agree "
          "| prefill s | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        ppl = F.cross_entropy(r.logits, target).exp().item()
        agree = (r.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
        print(f"| {r.spec} | {r.kv_prefill / (fp16_per_token * start):.3f} "
              f"| {r.kv_end / (fp16_per_token * (len(ids) - 1)):.3f} | {r.kv_end / 2**20:.1f} MiB "
              f"| {ppl:.3f} | {100 * (ppl / ref_ppl - 1):+.1f}% | {agree:.3f} | {r.prefill_s:.2f} "
              f"| {r.decode_tok_s:.1f} |")


if __name__ == "__main__":
    main()
