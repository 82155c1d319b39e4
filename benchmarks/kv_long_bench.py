"""Long-context KV-cache benchmark: quality, passkey retrieval, time to first token and decode speed per policy.

For each context length and KV spec it appends JSONL records (``--out``), one per finished measurement, so an
interrupted run keeps what it did and a rerun with the same arguments only does what is missing:

* ``tail``: the corpus window's first ``context - tail`` tokens are prefilled (and compressed by the policy;
  GemFilter first shortens them), the last ``tail`` tokens are teacher-forced through the compressed cache
  ``chunk`` tokens per step. Records perplexity, argmax ids (top-1 agreement with the full cache is computed in
  the report) and ``cache.nbytes()`` after prefill and at the end, against an fp16 cache of the same tokens.
* ``passkey``: one prompt of exactly ``context`` tokens per haystack kind, depth and trial (``frugallm.lab.passkey``:
  prose, stdlib code, lists, or the classic repeated sentences), answered greedily through each policy's cache.
  Records the answer, time to first token and every decode step's time; the report counts needles (``19/24``)
  per policy, haystack and depth, since a retrieval claim on a handful of needles in one kind of text misleads.
* ``layers`` (GemFilter's filter layer): on the same prompts, the share of the key's tokens that the top 25%
  selection by the last window's attention keeps, at every layer up to ``--max-layer``.

Every policy except a prompt selector runs the same prefill computation: prefill attends over the exact prompt
and a policy only decides what is stored afterwards. So one forward pass feeds all caches (``FanOutCache``),
which times each cache's own work; a policy's time to first token is the shared forward pass minus the other
caches' time. GemFilter runs its own path (filter pass, then the shorter prefill). Decode steps run
round-robin over the policies, so load changes on a shared machine hit all of them alike; speeds are medians.

    python benchmarks/kv_long_bench.py --plan 2048:4x2 --haystacks prose,code,list --tasks passkey \
        --specs "streamingllm:budget=0.25;h2o:budget=0.25;snapkv:budget=0.25" --out /tmp/kv_needles.jsonl
    python benchmarks/kv_long_bench.py --plan 2048:5x1,4096:5x1,8192:3x1 --out /tmp/kv_long.jsonl
    python benchmarks/kv_long_bench.py --report /tmp/kv_long.jsonl          # markdown tables only
    python benchmarks/kv_long_bench.py --specs "kivi:bits=2" --force ...    # redo these rows
    python benchmarks/kv_long_bench.py --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --plan 4096:4x2 \
        --tasks passkey --specs "snapkv:budget=0.25;speckv:budget=0.25;specpc:budget=0.25" --out /tmp/kv_spec.jsonl

SpecKV / SpecPC (``frugallm.kv.speckv``) rank with a draft model: ``--draft`` (or their ``draft=``) loads it.
SpecKV's prefill runs the draft's lookahead after the prompt, so it has its own pass (and its own TTFT, draft
included), like a prompt selector.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from frugallm import LLM
from frugallm.corpus import load_corpus
from frugallm.kv import build_kv_cache, parse_kv_spec, select_prompt_tokens
from frugallm.kv.gemfilter import ProbeCache, StopForward
from frugallm.kv.speckv import attach_draft, draft_name, draft_policies, prefill_with_lookahead
from frugallm.lab import passkey
from frugallm.model.kv_cache import KVCache

DEFAULT_SPECS = [
    "full",
    "streamingllm:budget=0.25",
    "h2o:budget=0.25",
    "snapkv:budget=0.25",
    "lacache:budget=0.25",
    "gemfilter:budget=0.25,layer=5",  # the filter layer measured on the default model (see kv/gemfilter.py)
    "kivi:bits=2",
    "kivi:bits=4",
    "snapkv:budget=0.25+kivi:bits=2",
]
ANSWER_TOKENS = 10  # " " + five digits + "." fit; stops early once the key is out


class FanOutCache(KVCache):
    """Hands every layer's keys/values to several caches; attention reads the first one's (exact) view.

    Valid for prefill only: every cache returns the exact prompt keys/values there.
    """

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
        self.seconds = [0.0] * len(caches)  # each cache's own time (its update calls)

    def update(self, layer, k, v, *, q=None, x=None, positions=None):  # noqa: ANN001, ANN201
        out = None
        for i, cache in enumerate(self.caches):
            t0 = time.perf_counter()
            res = cache.update(layer, k, v, q=q, x=x, positions=positions)
            self.seconds[i] += time.perf_counter() - t0
            out = res if out is None else out
        return out

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def reserved_bytes(self) -> int:
        return sum(c.reserved_bytes() for c in self.caches)

    @property
    def num_slots(self) -> int:
        return self.caches[0].num_slots


@dataclass
class State:
    """One policy's cache after prefill, and where its next token goes."""

    cache: KVCache
    pos: int
    logits: torch.Tensor  # [vocab] for the next token
    ttft_s: float
    kv_prefill: int


@torch.inference_mode()
def prefill(llm: LLM, specs: list[str], ids: list[int], extra: int, kv_dtype: torch.dtype) -> dict[str, State]:
    """Prefill ``ids`` into every spec's cache: one shared forward pass, prompt selectors on their own."""
    model, dev = llm.model, llm.device
    assert specs[0] == "full"

    def new_cache(spec: str, n: int) -> KVCache:
        # As LLM.make_cache: compressed caches store exact slots in the model's half dtype.
        half = getattr(llm, "dtype", None)
        store = half if half in (torch.float16, torch.bfloat16) else None
        return build_kv_cache(spec, model, batch=1, capacity=n + extra, dtype=kv_dtype, device=dev,
                              store_dtype=store)

    def forward(prompt: list[int], cache: KVCache) -> torch.Tensor:
        return model(torch.tensor([prompt], device=dev), torch.arange(len(prompt), device=dev)[None], cache,
                     "last")[0]

    # Prompt selectors and draft-ranked policies (SpecKV's lookahead joins the prefill) run their own pass.
    shared = [s for s in specs if parse_kv_spec(s).selector is None and not draft_policies(parse_kv_spec(s))]
    fan = FanOutCache([new_cache(s, len(ids)) for s in shared])
    t0 = time.perf_counter()
    logits = forward(ids, fan)
    base = time.perf_counter() - t0 - sum(fan.seconds)
    states = {s: State(c, len(ids), logits, base + sec, c.nbytes())
              for s, c, sec in zip(shared, fan.caches, fan.seconds, strict=True)}
    for spec in specs:
        if spec in states:
            continue
        t0 = time.perf_counter()
        prompt = select_prompt_tokens(spec, model, ids) or ids
        cache = new_cache(spec, len(prompt))
        x = torch.tensor([prompt], device=dev)
        logits = prefill_with_lookahead(parse_kv_spec(spec), model, x, torch.arange(len(prompt), device=dev)[None],
                                        cache)[0]
        states[spec] = State(cache, len(prompt), logits, time.perf_counter() - t0, cache.nbytes())
    return states


@torch.inference_mode()
def step(llm: LLM, st: State, tokens: list[int]) -> torch.Tensor:
    """Append ``tokens`` to ``st``'s cache; logits ``[len(tokens), vocab]``."""
    dev = llm.device
    pos = torch.arange(st.pos, st.pos + len(tokens), device=dev)[None]
    out = llm.model(torch.tensor([tokens], device=dev), pos, st.cache, "all")[0]
    st.pos += len(tokens)
    return out


def run_tail(llm: LLM, specs: list[str], ids: list[int], tail: int, chunk: int,
             kv_dtype: torch.dtype) -> list[dict[str, Any]]:
    """Prefill ``ids[:-tail]``, teacher-force the rest through every cache (round-robin, ``chunk`` per step)."""
    start = len(ids) - tail
    states = prefill(llm, specs, ids[:start], tail, kv_dtype)
    preds = {s: [st.logits[None]] for s, st in states.items()}
    for i in range(start, len(ids) - 1, chunk):
        toks = ids[i:min(i + chunk, len(ids) - 1)]
        for s in specs:
            preds[s].append(step(llm, states[s], toks))
    target = torch.tensor(ids[start:])
    fp16 = fp16_bytes_per_token(llm)
    out = []
    for s in specs:
        logits = torch.cat(preds[s]).float()
        out.append({"nll": F.cross_entropy(logits, target).item(), "argmax": logits.argmax(-1).tolist(),
                    "kv_prefill": states[s].kv_prefill, "kv_end": states[s].cache.nbytes(),
                    "fp16_prefill": fp16 * start, "fp16_end": fp16 * (len(ids) - 1), "ttft_s": states[s].ttft_s})
    return out


def run_passkey(llm: LLM, specs: list[str], prompt: passkey.PasskeyPrompt,
                kv_dtype: torch.dtype) -> list[dict[str, Any]]:
    """Greedy answers through every cache, one decode step per policy in turn."""
    tok = llm.tokenizer
    states = prefill(llm, specs, prompt.ids, ANSWER_TOKENS, kv_dtype)
    answers: dict[str, list[int]] = {s: [] for s in specs}
    steps: dict[str, list[float]] = {s: [] for s in specs}
    active = list(specs)
    while active:
        for s in list(active):
            st = states[s]
            t = int(st.logits.argmax())
            answers[s].append(t)
            if t in tok.eos_ids or prompt.key in tok.decode(answers[s]) or len(answers[s]) >= ANSWER_TOKENS:
                active.remove(s)
                continue
            t0 = time.perf_counter()
            st.logits = step(llm, st, [t])[-1]
            steps[s].append(time.perf_counter() - t0)
    fp16 = fp16_bytes_per_token(llm) * len(prompt.ids)
    return [{"answer": tok.decode(answers[s]), "correct": prompt.key in tok.decode(answers[s]),
             "ttft_s": states[s].ttft_s, "decode_s": steps[s], "kv_prefill": states[s].kv_prefill,
             "fp16_prefill": fp16} for s in specs]


@torch.inference_mode()
def needle_recall(llm: LLM, prompt: passkey.PasskeyPrompt, last: int, budget: float = 0.25,
                  window: int = 8) -> list[float]:
    """Per layer ``0..last``: share of the key's digit tokens in GemFilter's top-``budget`` selection."""
    ids, n = prompt.ids, len(prompt.ids)
    span = range(prompt.needle_start, prompt.needle_start + prompt.needle_len)
    digits = [i for i in span if any(ch.isdigit() for ch in llm.tokenizer.decode([ids[i]]))]
    probe = ProbeCache(last, window, every_layer=True)
    with contextlib.suppress(StopForward):  # the probe ends the pass after the deepest layer tried
        llm.model(torch.tensor([ids]), torch.arange(n)[None], probe, "last")
    recall = []
    for layer_scores in probe.scores:
        scores = layer_scores[0].sum(0)  # [T]
        scores[n - window:] = float("inf")
        keep = set(scores.topk(math.ceil(budget * n)).indices.tolist())
        recall.append(sum(i in keep for i in digits) / len(digits))
    return recall


def fp16_bytes_per_token(llm: LLM) -> int:
    cfg = llm.config
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2


# -- records ----------------------------------------------------------------------------------------------------


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_key(r: dict[str, Any]) -> tuple:
    return (r["kind"], r["context"], r["spec"], r.get("depth"), r.get("trial"), r.get("haystack", "repeat"))


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record per key (a rerun replaces earlier results)."""
    return list({record_key(r): r for r in records}.values())


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def report(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per context and spec, then passkey accuracy per depth."""
    recs = latest(records)
    tails = {(r["context"], r["spec"]): r for r in recs if r["kind"] == "tail"}
    keys: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        if r["kind"] == "passkey":
            keys[(r["context"], r["spec"])].append(r)
    contexts = sorted({r["context"] for r in recs})
    order = list(dict.fromkeys([*DEFAULT_SPECS, *(r["spec"] for r in recs)]))
    lines = ["| context | policy | KV x fp16 | KV x full | tail PPL | dPPL | top-1 | passkey | vs full | TTFT s "
             "| TTFT x full | decode tok/s | x full | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    depth_lines = ["| context | policy | needles found per haystack | per depth |", "|---|---|---|---|"]

    def fmt(x: float | None, f: str) -> str:
        return "-" if x is None else format(x, f)

    for c in contexts:
        ref_t, ref_p = tails.get((c, "full")), keys.get((c, "full"), [])
        ref_acc = sum(r["correct"] for r in ref_p) / len(ref_p) if ref_p else None
        ref_ttft = _median([r["ttft_s"] for r in ref_p])
        ref_dec = _median([x for r in ref_p for x in r["decode_s"]])
        for s in order:
            t, p = tails.get((c, s)), keys.get((c, s), [])
            if t is None and not p:
                continue
            # KV bytes right after prefilling the context (passkey prompts), else at the tail's end.
            kv = p[0]["kv_prefill"] / p[0]["fp16_prefill"] if p else t["kv_end"] / t["fp16_end"]
            ref = ref_p[0]["kv_prefill"] / ref_p[0]["fp16_prefill"] if p and ref_p else (
                ref_t["kv_end"] / ref_t["fp16_end"] if t and ref_t else None)
            ppl = dppl = top1 = None
            if t:
                ppl = float(torch.tensor(t["nll"]).exp())
                if ref_t:
                    dppl = 100 * (ppl / float(torch.tensor(ref_t["nll"]).exp()) - 1)
                    a, b = torch.tensor(t["argmax"]), torch.tensor(ref_t["argmax"])
                    top1 = (a == b).float().mean().item() if a.shape == b.shape else None
            acc = vs = ttft = dec = None
            pk, load = "-", [r["load"] for r in (*p, *([t] if t else []))]
            if p:
                good = sum(r["correct"] for r in p)
                acc, pk = good / len(p), f"{good}/{len(p)}"
                vs = acc / ref_acc if ref_acc else None
                ttft = _median([r["ttft_s"] for r in p])
                step_s = _median([x for r in p for x in r["decode_s"]])
                dec = 1 / step_s if step_s else None
                by_depth: dict[float, list[bool]] = defaultdict(list)
                by_stack: dict[str, list[bool]] = defaultdict(list)
                for r in p:
                    by_depth[r["depth"]].append(r["correct"])
                    by_stack[r.get("haystack", "repeat")].append(r["correct"])
                depth_lines.append(f"| {c} | {s} | " + ", ".join(
                    f"{h}: {sum(v)}/{len(v)}" for h, v in by_stack.items()) + " | " + " ".join(
                    f"{d:g}: {sum(v)}/{len(v)}" for d, v in sorted(by_depth.items())) + " |")
            lines.append(
                f"| {c} | {s} | {kv:.3f} | {fmt(kv / ref if ref else None, '.3f')} | {fmt(ppl, '.3f')} "
                f"| {fmt(dppl, '+.1f')}{'%' if dppl is not None else ''} "
                f"| {fmt(top1, '.3f')} | {pk} | {fmt(vs, '.2f')} | {fmt(ttft, '.2f')} "
                f"| {fmt(ref_ttft / ttft if ttft and ref_ttft else None, '.2f')} | {fmt(dec, '.2f')} "
                f"| {fmt(dec * ref_dec if dec and ref_dec else None, '.2f')} | {fmt(_median(load), '.1f')} |")
    layer_lines = []
    for c in contexts:
        recalls = [r["recall"] for r in recs if r["kind"] == "layers" and r["context"] == c]
        if recalls:
            if not layer_lines:
                layer_lines = ["", "| context | prompts | GemFilter needle recall by filter layer (top 25%, "
                               "last 8 queries) |", "|---|---:|---|"]
            mean = [sum(col) / len(col) for col in zip(*recalls, strict=False)]
            layer_lines.append(f"| {c} | {len(recalls)} | " + " ".join(f"L{i}: {x:.2f}" for i, x in
                                                                      enumerate(mean)) + " |")
    return "\n".join(lines + ["", *depth_lines, *layer_lines]) + "\n"


# -- driver -----------------------------------------------------------------------------------------------------


def parse_plan(text: str) -> list[tuple[int, int, int]]:
    """``2048:5x1,8192:3x1`` -> [(context, depths, trials)]; depths are evenly spaced, (i + 0.5) / n."""
    plan = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        ctx, _, rest = item.partition(":")
        depths, _, trials = (rest or "5x1").partition("x")
        plan.append((int(ctx), int(depths), int(trials or 1)))
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--plan", default="2048:5x1,4096:5x1,8192:3x1",
                    help="context:DEPTHSxTRIALS,... passkey prompts per context (depths evenly spaced)")
    ap.add_argument("--specs", default=";".join(DEFAULT_SPECS), help="';'-separated KV specs (full is added)")
    ap.add_argument("--tasks", default="tail,passkey", help="any of tail, passkey, layers")
    ap.add_argument("--max-layer", type=int, default=12, help="layers task: deepest filter layer tried")
    ap.add_argument("--tail", type=int, default=128, help="tokens teacher-forced after the prefill")
    ap.add_argument("--chunk", type=int, default=8, help="tail tokens per step (1 = one decode step per token)")
    ap.add_argument("--kv-dtype", default="float32", choices=["float32", "float16"],
                    help="full-precision cache storage (float32: what the engine uses on CPU)")
    ap.add_argument("--haystacks", default="prose,code,list",
                    help="passkey filler kinds (frugallm.lab.passkey.HAYSTACKS): repeat, prose, code, list")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--offset", type=int, default=20_000)
    ap.add_argument("--out", default="kv_long.jsonl")
    ap.add_argument("--md", default=None, help="markdown table rewritten after every record")
    ap.add_argument("--force", action="store_true", help="rerun the given specs even where records exist")
    ap.add_argument("--report", default=None, help="only print the tables of this JSONL file")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--draft", default=None,
                    help="draft model of speckv / specpc specs without draft= (e.g. qwen2.5-coder-0.5b)")
    args = ap.parse_args()
    if args.report:
        print(report(load_records(Path(args.report))), end="")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [s.strip() for s in args.specs.split(";") if s.strip()]
    for s in specs:
        parse_kv_spec(s)
    specs = ["full", *[s for s in specs if s != "full"]]
    out, md = Path(args.out), Path(args.md) if args.md else None
    done = set() if args.force else {record_key(r) for r in load_records(out)}
    llm = LLM(args.model, device="cpu")
    drafts = [draft_name(parse_kv_spec(s), args.draft) for s in specs]
    for name in dict.fromkeys(d for d in drafts if d is not None):
        from frugallm.spec import check_same_vocab

        draft = LLM(name, device="cpu")
        check_same_vocab(llm.tokenizer, draft.tokenizer, args.model, name)
        attach_draft(llm.model, draft.model, name, draft.kv_dtype)
        if name == args.draft:
            attach_draft(llm.model, draft.model, None, draft.kv_dtype)
    kv_dtype = getattr(torch, args.kv_dtype)
    text = load_corpus(args.corpus)[args.offset:]
    tasks = args.tasks.split(",")
    stacks = [passkey.haystack(h, None if args.corpus is None else load_corpus(args.corpus))
              for h in passkey.parse_haystacks(args.haystacks)]

    def save(recs: list[dict[str, Any]]) -> None:
        with out.open("a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        if md is not None:
            md.write_text(report(load_records(out)))

    def todo(kind: str, ctx: int, depth: float | None = None, trial: int | None = None,
             stack: str = "repeat") -> list[str]:
        missing = [s for s in specs if (kind, ctx, s, depth, trial, stack) not in done]
        return ["full", *[s for s in missing if s != "full"]] if missing else []

    for ctx, n_depths, trials in parse_plan(args.plan):
        meta = {"context": ctx, "model": args.model, "kv_dtype": args.kv_dtype, "threads": torch.get_num_threads()}
        run = todo("tail", ctx)
        if "tail" in tasks and run:
            ids = llm.tokenizer.encode(text[: 8 * ctx], add_special_tokens=False)[:ctx]
            t0 = time.perf_counter()
            res = run_tail(llm, run, ids, args.tail, args.chunk, kv_dtype)
            load = os.getloadavg()[0]
            save([{"kind": "tail", **meta, "spec": s, "tail": args.tail, "chunk": args.chunk, "load": load, **r}
                  for s, r in zip(run, res, strict=True)])
            print(f"{ctx} tail: {len(run)} specs in {time.perf_counter() - t0:.0f}s, load {load:.1f}", flush=True)
        if "passkey" not in tasks and "layers" not in tasks:
            continue
        for stack in stacks:
            # "repeat" keeps the prompts (keys, filler offsets) of runs made before haystacks had kinds.
            salt = 0 if stack.name == "repeat" else 1 + passkey.HAYSTACKS.index(stack.name)
            tag = {} if stack.name == "repeat" else {"haystack": stack.name}
            for di in range(n_depths):
                depth = round((di + 0.5) / n_depths, 3)
                for trial in range(trials):
                    rng_seed = ctx * 1000 + di * 10 + trial  # the same prompt on every rerun
                    key = str(10000 + ((rng_seed + 7 * salt) * 7919) % 90000)
                    start = rng_seed % 5 if not salt else (rng_seed * 7919) % len(stack.units)
                    prompt = passkey.make_prompt(llm.tokenizer, ctx, depth, key, sentences=stack.units, start=start,
                                                 sep=stack.sep)
                    what = f"{ctx} {stack.name} depth {depth} trial {trial}"
                    if "layers" in tasks and (args.force or ("layers", ctx, "gemfilter", depth, trial, stack.name)
                                              not in done):
                        recall = needle_recall(llm, prompt, args.max_layer)
                        save([{"kind": "layers", **meta, **tag, "spec": "gemfilter", "depth": depth,
                               "trial": trial, "recall": recall, "load": os.getloadavg()[0]}])
                        print(f"{what}: recall by layer {recall}", flush=True)
                    run = todo("passkey", ctx, depth, trial, stack.name) if "passkey" in tasks else []
                    if not run:
                        continue
                    t0 = time.perf_counter()
                    res = run_passkey(llm, run, prompt, kv_dtype)
                    load = os.getloadavg()[0]
                    save([{"kind": "passkey", **meta, **tag, "spec": s, "depth": depth, "trial": trial, "key": key,
                           "actual_depth": round(prompt.actual_depth, 4), "load": load, **r}
                          for s, r in zip(run, res, strict=True)])
                    got = " ".join(f"{s}{'+' if r['correct'] else '-'}" for s, r in zip(run, res, strict=True))
                    print(f"{what}: {got} ({time.perf_counter() - t0:.0f}s, load {load:.1f})", flush=True)
    print(report(load_records(out)), end="")


if __name__ == "__main__":
    main()
