"""KV policies under continuous batching: sequences that fit in one KV block budget, c16 throughput, needles.

Runs the serving engine (``LLMEngine``, what ``frugallm serve`` steps) in-process on passkey prompts of exactly
``--context`` tokens (``frugallm.lab.passkey``: a needle "The pass key is NNNNN" at spread depths in a
``--haystack`` filler), greedy, ``--output-len`` tokens each (``ignore_eos``), once per KV spec ("full" first,
then each of ``--kv``), on the same prompts:

* ``capacity``: a pool of ``--full-seqs`` full-length sequences' blocks (prompt + output), ``--requests`` prompts
  submitted at once, ``max_num_seqs`` high enough never to bind. Records the peak and mean number of sequences
  running together (blocks are the only limit; SnapKV returns ~75 % of a prompt's blocks after its prefill),
  preemptions, output tok/s and the needles found.
* ``c16``: ``max_num_seqs=16`` with a pool that holds 16 full sequences (no preemption either way), the same
  prompts: output tok/s, total tok/s (prompt + output), TTFT p50 and TPOT mean, needles found.

Needle accuracy is the share of answers containing the key. Each record names the machine's load average, and
``fit``: how many sequences of the run's mean final size (blocks held at the end, packed ones included) the pool
holds, the memory bound on concurrency. The measured peak also depends on timing: with a short ``--output-len``
a sequence finishes before the next few prompts are prefilled (in session 7, 2k prompts and 32 output tokens
peaked at 8 running even in a pool of 16 full sequences), so measure capacity with a long output
(``--output-len 256``). A prompt holds all its blocks until the pass that ends it; the scheduler prefills one
long compressible prompt at a time, admitted only when its whole prompt fits, so a pool of B blocks runs about
(B - prompt blocks) / kept blocks compressed sequences. KIVI (``kivi:bits=2``, alone or after snapkv) packs the
oldest tokens into pool blocks after the prompt (chunks of whole key groups, 6x fewer bytes than bf16 at 2 bits),
keeping its sinks and ``residual`` window exact; packed rows decode on the fused paged kernel with their chunks read
from their codes (``csrc/kivi_attention.cpp``); ``--packed-attention both`` runs each KIVI spec a second time with
the packed rows dequantized in torch (gather + SDPA for the whole batch, the path before it), to measure it, in
the same process. KIVI's default key group (64) loses 2-bit needles here; ``group=32`` (the KIVI paper's, ~8 %
more KV bytes) kept them in a first check. H2O reads every prompt query, so
its prompts are one pass: give it ``--max-num-batched-tokens`` >= ``--context`` (and the same to the others, for
a fair comparison).

    python benchmarks/kv_serve_bench.py --model qwen2.5-coder-0.5b --context 2048 --requests 32 \
        --kv "snapkv:budget=0.25;streamingllm:budget=0.25,positions=original" --threads 2 --out /tmp/kv_serve.json
    python benchmarks/kv_serve_bench.py --model qwen2.5-coder-0.5b --context 2048 --requests 32 --threads 2 \
        --kv "h2o:budget=0.25" --max-num-batched-tokens 2304 --out /tmp/kv_serve_h2o.json
    python benchmarks/kv_serve_bench.py --model qwen2.5-coder-0.5b --context 2048 --requests 32 --threads 2 \
        --output-len 256 --kv "snapkv:budget=0.25;snapkv:budget=0.25+kivi:bits=2;kivi:bits=2" --out /tmp/kv_kivi.json
    python benchmarks/kv_serve_bench.py --model qwen2.5-coder-0.5b --context 2048 --requests 16 --threads 2 \
        --output-len 256 --packed-attention both --out /tmp/kv_kivi_c16.json \
        --kv "snapkv:budget=0.25;snapkv:budget=0.25+kivi:bits=2;snapkv:budget=0.25+kivi:bits=2,group=32"
    python benchmarks/kv_serve_bench.py --context 512 --requests 4 --output-len 8 --tasks capacity  # sanity run
    python benchmarks/kv_serve_bench.py --model qwen2.5-coder-1.5b --context 2048 --requests 32 --threads 2 \
        --kv "snapkv:budget=0.25;speckv:budget=0.25,draft=qwen2.5-coder-0.5b" --out /tmp/kv_serve_speckv.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from frugallm import LLM, SamplingParams, cpu
from frugallm.engine import paged_cache
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.kv import paged_quantizer, parse_kv_spec
from frugallm.kv.speckv import draft_policies
from frugallm.lab import passkey


def needle_prompts(llm: LLM, n: int, context: int, stack: str) -> list[passkey.PasskeyPrompt]:
    """``n`` prompts of exactly ``context`` tokens, needles at depths spread over (0, 1), distinct keys/filler."""
    hay = passkey.haystack(stack)
    out = []
    for i in range(n):
        depth = round((i % 8 + 0.5) / 8, 3)
        key = str(10000 + (i * 7919 + context) % 90000)
        out.append(passkey.make_prompt(llm.tokenizer, context, depth, key, sentences=hay.units,
                                       start=(i * 7919) % len(hay.units), sep=hay.sep))
    return out


def run(llm: LLM, prompts: list[passkey.PasskeyPrompt], kv: str, *, num_blocks: int, block_size: int,
        max_num_seqs: int, max_batched: int, output_len: int, packed_torch: bool = False) -> dict[str, Any]:
    """All prompts at once through one engine; per-step concurrency, then speed and needles. ``packed_torch``:
    KIVI-packed rows attend on the torch path (dequantize + SDPA) instead of the fused kernels."""
    if packed_torch:
        available = paged_cache.kernel_available
        paged_cache.kernel_available = lambda: False
        try:
            return {**run(llm, prompts, kv, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_batched=max_batched, output_len=output_len), "packed_attention": "torch"}
        finally:
            paged_cache.kernel_available = available
    engine = LLMEngine(llm, EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched,
                                         block_size=block_size, num_blocks=num_blocks, kv=kv))
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    rids = [engine.add_request(p.ids, params, arrival_time=start) for p in prompts]
    seqs = [engine.requests[r].seqs[0] for r in rids]
    running, used = [], []
    bytes_per_block = engine.cache.bytes_per_block
    while engine.has_unfinished_requests():
        engine.step()
        running.append(sum(1 for s in engine.scheduler.running if s.num_computed_tokens >= s.num_prompt_tokens))
        used.append(engine.block_manager.num_used_blocks)
    wall = time.perf_counter() - start
    outs = [s.output() for s in seqs]
    found = sum(p.key in o.text for p, o in zip(prompts, outs, strict=True))
    n_out = sum(len(o.token_ids) for o in outs)
    ttft = [o.metrics["ttft_s"] for o in outs if "ttft_s" in o.metrics]
    tpot = [o.metrics["tpot_s"] for o in outs if "tpot_s" in o.metrics]
    busy = [r for r in running if r]
    return {
        "kv": kv, "num_blocks": num_blocks, "block_size": block_size, "max_num_seqs": max_num_seqs,
        "requests": len(prompts), "context": len(prompts[0].ids), "output_len": output_len,
        "peak_running": max(running), "mean_running": statistics.fmean(busy) if busy else 0.0,
        "peak_blocks": max(used), "preemptions": engine.scheduler.num_preemptions,
        "uncompacted": engine.num_uncompacted,
        "kv_bytes_per_seq": statistics.fmean(o.metrics.get("kv_cache_bytes", 0) for o in outs),
        "fit": num_blocks * bytes_per_block / max(1.0, statistics.fmean(o.metrics.get("kv_cache_bytes", 0)
                                                                        for o in outs)),
        "packed_chunks": engine.packer.num_packed_chunks, "packing_deferred": engine.packer.num_deferred,
        "wall_s": wall, "output_tok_s": n_out / wall,
        "total_tok_s": (n_out + sum(len(p.ids) for p in prompts)) / wall,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
        "needles": f"{found}/{len(prompts)}", "needle_acc": found / len(prompts),
        "answers": [o.text[:40] for o in outs], "load": os.getloadavg()[0],
        "packed_attention": "kernel" if paged_cache.kernel_available() else "torch",
    }


def table(recs: list[dict[str, Any]]) -> str:
    rows = ["| task | kv | pool blocks | peak / mean running | fit | preemptions | KV MiB/seq | out tok/s "
            "| total tok/s | TTFT p50 s | TPOT ms | needles |", "|" + "---|" * 12]
    for r in recs:
        tpot = "-" if r["tpot_mean_s"] is None else f"{1e3 * r['tpot_mean_s']:.1f}"
        ttft = "-" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.2f}"
        kv = r["kv"] + (" (torch attn)" if r.get("packed_attention") == "torch" and "kivi" in r["kv"] else "")
        rows.append(f"| {r['task']} | {kv} | {r['num_blocks']} | {r['peak_running']} / {r['mean_running']:.1f} "
                    f"| {r['fit']:.1f} | {r['preemptions']} | {r['kv_bytes_per_seq'] / 2**20:.1f} "
                    f"| {r['output_tok_s']:.1f} "
                    f"| {r['total_tok_s']:.1f} | {ttft} | {tpot} | {r['needles']} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto", help="auto: as `frugallm serve` (bf16 where the CPU has it natively)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens (exactly)")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--haystack", default="prose", choices=passkey.HAYSTACKS)
    ap.add_argument("--kv", default="snapkv:budget=0.25;streamingllm:budget=0.25,positions=original",
                    help="';'-separated specs compared with the full cache (kv.paged_names() run under batching)")
    ap.add_argument("--tasks", default="capacity,c16")
    ap.add_argument("--full-seqs", type=int, default=4, help="capacity: the pool holds this many full sequences")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--packed-attention", default="kernel", choices=("kernel", "both"),
                    help="both: each KIVI spec also with packed rows dequantized in torch (no kernel)")
    ap.add_argument("--out", default=None, help="write the records as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype
    if dtype == "auto" and cpu.fast_bf16():
        dtype = "bfloat16"  # what serve picks on such CPUs
    specs = ["full", *[s.strip() for s in args.kv.split(";") if s.strip()]]
    # speckv ranks with a draft model: LLM(kv=...) loads the one it names (each run's engine applies its own spec).
    drafted = [s for s in specs if draft_policies(parse_kv_spec(s))]
    llm = LLM(args.model, dtype=dtype, kv=drafted[0] if drafted else None)
    prompts = needle_prompts(llm, args.requests, args.context, args.haystack)
    per_seq = -(-(args.context + args.output_len) // args.block_size)
    common = {"block_size": args.block_size, "max_batched": args.max_num_batched_tokens,
              "output_len": args.output_len}
    recs: list[dict[str, Any]] = []
    tasks = args.tasks.split(",")
    for task in ("capacity", "c16"):
        if task not in tasks:
            continue
        for kv in specs:
            quantized = kv != "full" and paged_quantizer(kv) is not None
            for packed_torch in (False, True) if quantized and args.packed_attention == "both" else (False,):
                if task == "capacity":
                    r = run(llm, prompts, kv, num_blocks=args.full_seqs * per_seq,
                            max_num_seqs=max(64, args.requests), packed_torch=packed_torch, **common)
                else:
                    r = run(llm, prompts, kv, num_blocks=16 * per_seq, max_num_seqs=16, packed_torch=packed_torch,
                            **common)
                recs.append({"task": task, "model": args.model, "dtype": dtype, "threads": torch.get_num_threads(),
                             **r})
                print(f"{task} {kv} ({r['packed_attention']} attn): peak running {r['peak_running']} "
                      f"(fit {r['fit']:.1f}), {r['output_tok_s']:.1f} out tok/s, {r['total_tok_s']:.1f} total tok/s, "
                      f"needles {r['needles']}, {r['wall_s']:.0f} s, load {r['load']:.1f}", flush=True)
    print(table(recs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
