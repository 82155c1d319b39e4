"""Speculative decoding on Qwen2.5-Coder-1.5B (issue 14's targets), each against the same model without it.

Sections (``--sections``, default all): ``verify``: one target pass of r rows vs one decode step (the cost of
verifying r - 1 drafts, which bounds the speedup); ``edit``: "add type hints and return the function whole"
with ``ngram`` vs plain, and llama-cpp-python with ``LlamaPromptLookupDecoding`` (skipped without llama_cpp);
``codegen``: a short instruction with ``draft`` (Qwen2.5-Coder-0.5B, as stored and with ``weights=stored-q8``: int8
activations on the draft only) and ``self:layers=7`` (the target's first quarter) vs plain; ``draftcost``: one
decode step of each draft candidate (the 0.5B as stored, the 0.5B at stored-q8, the target's first 1/4 and 1/2
layers: ``self``) over one target step, interleaved in one process, medians; ``chat``: open-ended chat with
adaptive ``ngram`` and ``draft`` vs plain; ``serve``: ``serve --spec`` (ngram, draft) vs the same server without it
at concurrency 1 (edit prompt) and ``--concurrency``; ``memory``: the memory speculation adds per proposer
(SpecMemo: draft weights, draft KV cache, candidate slots, verify logits) for the edit prompt at ``--max-tokens``,
and the blocks of the server's KV pool (``serve --spec``) a speculative request is charged, no timing. Greedy,
batch 1; decode tok/s = 1 / time per output token after the first; runs alternate plain and speculative, medians
reported with the acceptance stats.

    .venv/bin/python benchmarks/spec_bench.py --threads 2 --runs 3 --out /tmp/spec_bench.jsonl
    .venv/bin/python benchmarks/spec_bench.py --target default --draft default --runs 1 --max-tokens 16  # smoke
    .venv/bin/python benchmarks/spec_bench.py --sections memory  # SpecMemo table only (seconds)
    .venv/bin/python benchmarks/spec_bench.py --sections draftcost codegen --threads 2 --runs 3
    .venv/bin/python benchmarks/spec_bench.py --sections serve --threads 2  # serve --spec vs plain, c1 and c16

``--out`` appends one JSON line per measured pair (with the acceptance stats, machine and load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from frugallm import LLM, SamplingParams
from frugallm.cpu import model_name
from frugallm.engine.llm_engine import EngineConfig
from frugallm.engine.paged_cache import pool_dtype
from frugallm.spec import parse_spec
from frugallm.spec.memo import blocks_for_bytes, kv_bytes, plan

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
EDIT_CODE = '''def summarize_orders(orders, tax_rate, currency="EUR", skip_cancelled=True):
    totals = {}
    count = 0
    for order in orders:
        if skip_cancelled and order.get("status") == "cancelled":
            continue
        customer = order["customer"]
        amount = sum(item["price"] * item["quantity"] for item in order["items"])
        amount = amount * (1 + tax_rate)
        totals[customer] = totals.get(customer, 0.0) + amount
        count += 1
    best = max(totals, key=totals.get) if totals else None
    lines = [f"{name}: {value:.2f} {currency}" for name, value in sorted(totals.items())]
    return {"count": count, "best_customer": best, "report": "\\n".join(lines), "totals": totals}
'''
EDIT = f"Add type hints to this Python function and return the whole function, unchanged otherwise:\n\n{EDIT_CODE}"
CODEGEN = "Write a Python function that parses an ISO 8601 date string and returns the weekday name."
CHAT = "What are some good habits for staying focused while working from home? Answer in a few paragraphs."


def decode_rate(out: Any) -> float:
    return 1.0 / out.metrics["tpot_s"]


def run_pair(llm: LLM, prompt: str, spec: str, runs: int, max_tokens: int) -> dict[str, Any]:
    """Alternate plain and ``spec`` runs of the same greedy request; medians and the spec stats."""
    p = SamplingParams(max_tokens=max_tokens, temperature=0)
    cfg = parse_spec(spec)
    if cfg.method == "draft" and getattr(llm, "_bench_draft", None) != (cfg.model, cfg.weights):
        llm.set_spec(spec)  # load this draft (its own weights mode); the loop below toggles spec_cfg only
        llm._bench_draft = (cfg.model, cfg.weights)  # type: ignore[attr-defined]
    plain, fast, stats, same = [], [], [], True
    for _ in range(runs):
        llm.spec_cfg = None  # the same loaded model without speculation
        a = llm.generate(prompt, p)[0]
        llm.spec_cfg = cfg
        b = llm.generate(prompt, p)[0]
        plain.append(decode_rate(a))
        fast.append(decode_rate(b))
        stats.append(b.metrics)
        same = same and a.token_ids == b.token_ids
    m = stats[len(stats) // 2]
    return {"spec": spec, "plain_tok_s": statistics.median(plain), "spec_tok_s": statistics.median(fast),
            "ratio": statistics.median(fast) / statistics.median(plain), "tokens": m["output_tokens"],
            "identical_tokens": same, **{k: v for k, v in m.items() if k.startswith("spec_")}}


def save(path: str | None, section: str, r: dict[str, Any], args: argparse.Namespace) -> None:
    if path is None:
        return
    rec = {"section": section, **r, "target": args.target, "draft": args.draft, "threads": args.threads,
           "max_tokens": args.max_tokens, "runs": args.runs, "cpu": model_name(), "load": os.getloadavg()[0],
           "time": time.time()}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def show(name: str, r: dict[str, Any]) -> None:
    print(f"{name:8s} {r['spec']:32s} plain {r['plain_tok_s']:6.2f} tok/s  spec {r['spec_tok_s']:6.2f} tok/s  "
          f"x{r['ratio']:.2f}  tokens {r['tokens']}  identical {r['identical_tokens']}  "
          f"accept {r['spec_acceptance_rate']:.2f}  mean len {r['spec_mean_accepted_length']:.2f}  "
          f"rounds {r['spec_rounds']} plain steps {r['spec_plain_steps']}  draft share {r['spec_draft_share']:.2f}  "
          f"by pos {r['spec_acceptance_by_position'][:8]}  +mem {r['spec_memory_bytes'] / 2**20:.1f} MiB")


def memory_table(llm: LLM, prompt: str, specs: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """SpecMemo per proposer: what speculation adds to decoding ``prompt`` without it, and the blocks of the
    server's KV pool (its dtype, the default block size) ``serve --spec`` charges a speculative request."""
    mc, n = llm.config, len(llm.tokenizer.encode(prompt))
    bs = EngineConfig.block_size
    bpb = kv_bytes(mc.num_layers, mc.num_kv_heads, mc.head_dim, bs, pool_dtype(llm.dtype, llm.kv_dtype, llm.device))
    rows = []
    for spec in specs:
        cfg = parse_spec(spec)
        own = cfg.method == "draft"
        memo = plan(cfg, mc, llm.draft.config if own else None, n, max_tokens, llm.kv_dtype)
        weights = llm.draft.weight_bytes() if own else 0
        r = {"spec": spec, "prompt_tokens": n, "max_tokens": max_tokens, "draft_weights": weights,
             "draft_kv": memo.draft_kv, "candidates_kv": memo.candidates_kv, "verify_logits": memo.logits,
             "added_bytes": weights + memo.spec_bytes, "plain_pool_blocks": -(-(n + max_tokens) // bs),
             "request_pool_blocks": blocks_for_bytes(memo.request_bytes, bpb),
             "draft_pool_blocks": blocks_for_bytes(memo.draft_kv, bpb), "pool_block_bytes": bpb}
        mib = 2**20
        print(f"memory  {spec:32s} adds {r['added_bytes'] / mib:7.1f} MiB (draft weights {weights / mib:.1f}, "
              f"draft KV {memo.draft_kv / mib:.2f}, candidates {memo.candidates_kv / 1024:.0f} KiB, verify logits "
              f"{memo.logits / 1024:.0f} KiB); serve pool blocks of {bs} tokens: request {r['request_pool_blocks']} "
              f"(plain decode {r['plain_pool_blocks']}) + draft {r['draft_pool_blocks']}")
        rows.append(r)
    return rows


@torch.inference_mode()
def verify_cost(llm: LLM, prompt: str, rows: list[int], reps: int) -> None:
    """Median time of one target pass of r rows after a prefill, over one decode step (r = 1)."""
    ids = llm.tokenizer.encode(prompt)
    n = len(ids)
    cache = llm.make_cache(1, n + 64)
    llm.model(torch.tensor([ids]), torch.arange(n)[None], cache, "last")
    base = None
    for r in rows:
        times = []
        for _ in range(reps):
            cache.truncate(n)
            x = torch.tensor([ids[-r:]])  # any tokens: the cost does not depend on them
            # A one-row step after a multi-row pass rebuilds the decode plan: warm it, as steady decoding does.
            if r == 1:
                llm.model(x, torch.tensor([[n]]), cache, "last")
                cache.truncate(n)
            t0 = time.perf_counter()
            llm.model(x, torch.arange(n, n + r)[None], cache, "all" if r > 1 else "last")
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        base = base or t
        print(f"verify  rows {r:2d}: {t * 1e3:7.1f} ms  x{t / base:.2f} of one decode step")


@torch.inference_mode()
def draft_cost(llm: LLM, prompt: str, draft: str, reps: int) -> list[dict[str, Any]]:
    """One-row decode step of each draft candidate over one target step, after the same prompt's prefill; the
    candidates take turns step by step (load hits them alike), medians of ``reps``."""
    from frugallm.spec import first_layers

    ids = llm.tokenizer.encode(prompt)
    n, layers = len(ids), llm.config.num_layers
    cands: list[tuple[str, Any, Any]] = [("target", llm.model, llm)]
    for weights in ("auto", "stored-q8"):
        d = LLM(draft, weights=weights)
        cands.append((f"draft:model={draft}:weights={d.weights}", d.model, d))
    for n_layers in (layers // 4, layers // 2):
        cands.append((f"self:layers={n_layers}", first_layers(llm.model, n_layers), llm))
    caches = []
    for _, model, owner in cands:
        cache = owner.make_cache(1, n + 8)
        model(torch.tensor([ids]), torch.arange(n)[None], cache, "last")
        model(torch.tensor([[ids[-1]]]), torch.tensor([[n]]), cache, "last")  # build the decode plan
        caches.append(cache)
    times: list[list[float]] = [[] for _ in cands]
    for _ in range(reps):
        for i, (_, model, _) in enumerate(cands):
            caches[i].truncate(n)
            t0 = time.perf_counter()
            model(torch.tensor([[ids[-1]]]), torch.tensor([[n]]), caches[i], "last")
            times[i].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    rows = []
    for (name, _, _), t in zip(cands, times, strict=True):
        med = statistics.median(t)
        print(f"draftcost {name:48s} {med * 1e3:7.1f} ms  x{med / base:.3f} of a target step")
        rows.append({"spec": name, "step_ms": med * 1e3, "x_target_step": med / base})
    return rows


def llama_cpp_peer(target: str, prompt: str, max_tokens: int, threads: int, runs: int) -> None:
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        print("llama.cpp  skipped: llama_cpp (llama-cpp-python) is not installed")
        return
    from frugallm.loading import resolve_model_path

    path = str(resolve_model_path(target))
    for name, draft in (("plain", None), ("prompt-lookup", LlamaPromptLookupDecoding(num_pred_tokens=10))):
        llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, draft_model=draft,
                    verbose=False)
        rates = []
        for _ in range(runs):
            llm.reset()
            first = last = None
            n = 0
            for chunk in llm.create_completion(prompt=prompt, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                               stream=True):
                if not chunk["choices"][0].get("text"):
                    continue
                last = time.perf_counter()
                first = first or last
                n += 1
            rates.append((n - 1) / (last - first) if n > 1 and last > first else float("nan"))
        print(f"llama.cpp {name:14s} {statistics.median(rates):6.2f} tok/s (decode, {n} chunks)")
        del llm


def serve_section(args: argparse.Namespace, tok: Any, edit_prompt: str) -> list[dict[str, Any]]:
    """``serve --spec`` against the same server without it (serve_bench's server and load generator): concurrency 1
    on the edit prompt (speculation's case) and ``--concurrency`` on distinct corpus prompts (the engine's: the
    solo request is gated off above 2 sequences; target >= 0.95x). One server per spec, fresh each."""
    import asyncio

    from serve_bench import ServerProcess, measured, run_load

    from frugallm.corpus import builtin_corpus

    ids = tok.encode(builtin_corpus())
    need = args.serve_requests * args.serve_prompt_len
    while len(ids) < need:
        ids = ids + ids
    prompts = [ids[i * args.serve_prompt_len:(i + 1) * args.serve_prompt_len] for i in range(args.serve_requests)]
    ns = argparse.Namespace(model=args.target, dtype="auto", max_num_seqs=16, max_num_batched_tokens=512,
                            threads=args.threads, weights=None if args.weights == "auto" else args.weights)
    rows: list[dict[str, Any]] = []
    for spec in (None, "ngram:k=8", f"draft:model={args.draft}:k=4"):
        with ServerProcess(ns, *(("--spec", spec) if spec else ())) as srv:
            asyncio.run(run_load(srv.url, prompts[:2], 4, 2))  # warm-up
            c1 = measured(srv.url, srv.proc.pid, [edit_prompt] * args.serve_c1_requests, args.max_tokens, 1)
            cn = measured(srv.url, srv.proc.pid, prompts, args.max_tokens, args.concurrency)
        row = {"spec": spec or "off", "c1_tok_s": c1["output_tok_s"], "c1_tpot_ms": c1["tpot_mean_s"] * 1e3,
               f"c{args.concurrency}_tok_s": cn["output_tok_s"], "ttft_p50_s": cn["ttft_p50_s"],
               "load": cn["load_avg"][0]}
        base = rows[0] if rows else row
        row["x_off_c1"] = row["c1_tok_s"] / base["c1_tok_s"]
        row[f"x_off_c{args.concurrency}"] = row[f"c{args.concurrency}_tok_s"] / base[f"c{args.concurrency}_tok_s"]
        print(f"serve   {row['spec']:36s} c1 (edit) {row['c1_tok_s']:7.2f} tok/s x{row['x_off_c1']:.2f} | "
              f"c{args.concurrency} {row[f'c{args.concurrency}_tok_s']:7.2f} tok/s "
              f"x{row[f'x_off_c{args.concurrency}']:.2f} | load {row['load']:.1f}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["memory", "verify", "edit", "codegen", "chat"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--target", default=TARGET)
    ap.add_argument("--draft", default=DRAFT, help="draft model of the codegen and chat sections")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--codegen-specs", nargs="+", default=None,
                    help="codegen: the specs to compare with plain (default: the draft as stored, at stored-q8, and "
                         "self:layers=7:k=4)")
    ap.add_argument("--concurrency", type=int, default=16, help="serve: the loaded server's concurrency")
    ap.add_argument("--serve-requests", type=int, default=32, help="serve: requests at --concurrency")
    ap.add_argument("--serve-c1-requests", type=int, default=3, help="serve: edit requests at concurrency 1")
    ap.add_argument("--serve-prompt-len", type=int, default=128, help="serve: tokens per corpus prompt")
    ap.add_argument("--weights", default="auto", choices=("auto", "stored", "stored-q8", "dequantize"),
                    help="the target's weights mode (stored-q8: int8 activations in decode and verify passes)")
    args = ap.parse_args()
    target, draft = args.target, args.draft
    torch.set_num_threads(args.threads)
    print(f"CPU: {model_name()}  threads {args.threads}  load average {os.getloadavg()}  torch {torch.__version__}")
    if args.sections == ["serve"]:  # servers only: no model in this process beyond the tokenizer's
        llm = LLM(target, device="cpu")
        tok, prompt = llm.tokenizer, llm.chat_prompt([{"role": "user", "content": EDIT}])
        del llm
        for r in serve_section(args, tok, prompt):
            save(args.out, "serve", r, args)
        return
    want_draft = {"codegen", "chat", "memory"} & set(args.sections)
    llm = LLM(target, spec=f"draft:model={draft}" if want_draft else None, weights=args.weights)
    chat = llm.chat_prompt
    if "memory" in args.sections:
        prompt = chat([{"role": "user", "content": EDIT}])
        for r in memory_table(llm, prompt, ["ngram:k=8", f"draft:model={draft}:k=4", "self:k=4"], args.max_tokens):
            save(args.out, "memory", r, args)
    if "verify" in args.sections:
        verify_cost(llm, chat([{"role": "user", "content": EDIT}]), [1, 2, 3, 4, 5, 6, 9, 15], reps=7)
    if "edit" in args.sections:
        prompt = chat([{"role": "user", "content": EDIT}])
        r = run_pair(llm, prompt, "ngram:k=8", args.runs, args.max_tokens)
        show("edit", r)
        save(args.out, "edit", r, args)
        llama_cpp_peer(target, prompt, args.max_tokens, args.threads, args.runs)
    if "draftcost" in args.sections:
        for r in draft_cost(llm, chat([{"role": "user", "content": CODEGEN}]), draft, reps=15):
            save(args.out, "draftcost", r, args)
    if "codegen" in args.sections:
        for spec in args.codegen_specs or (f"draft:model={draft}:k=4", f"draft:model={draft}:k=4:weights=stored-q8",
                                           "self:layers=7:k=4"):
            r = run_pair(llm, chat([{"role": "user", "content": CODEGEN}]), spec, args.runs, args.max_tokens)
            show("codegen", r)
            save(args.out, "codegen", r, args)
    if "chat" in args.sections:
        prompt = chat([{"role": "user", "content": CHAT}])
        for spec in ("ngram:k=8", f"draft:model={draft}:k=4"):
            r = run_pair(llm, prompt, spec, args.runs, args.max_tokens)
            show("chat", r)
            save(args.out, "chat", r, args)
    if "serve" in args.sections:
        for r in serve_section(args, llm.tokenizer, chat([{"role": "user", "content": EDIT}])):
            save(args.out, "serve", r, args)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
