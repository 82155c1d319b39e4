"""Where one speculative round's time goes (issue 14): the spec_bench edit prompt with ``ngram:k=8`` (or ``--spec``).

Wraps the parts of ``SpecDecoder``'s round with timers in one process and prints each part's total over one greedy
generation, in ms and in plain one-row steps: propose, the target's forward passes (verify passes of several rows
and one-row plain steps, each without the head), the head (norm + lm_head, ``Transformer.logits``), decode-plan
rebuilds (a one-row step after a multi-row pass), accept (argmax and comparison), cache truncation, ``Sequence.append``
(detokenize, stop checks), proposer rollback, the adaptive controller, and the rest (bookkeeping: the decoder's own
Python, tensor construction). The plain run of the same prompt on the same model comes first, for the step time.

    .venv/bin/python benchmarks/spec_profile.py --threads 2 --max-tokens 192
    .venv/bin/python benchmarks/spec_profile.py --target default --max-tokens 64   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from frugallm import LLM, SamplingParams
from frugallm.cpu import model_name
from frugallm.engine.sequence import Sequence
from frugallm.model import llama
from frugallm.model.kv_cache import ContiguousKVCache
from frugallm.spec import K_MAX, adaptive, decoder, ngram

TARGET = "qwen2.5-coder-1.5b"


class Timers:
    """Accumulated seconds and calls per part; ``wrap`` patches an attribute with a timed version for a ``with``."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)

    def timed(self, name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                key = name(*a, **kw) if callable(name) else name
                self.s[key] += time.perf_counter() - t0
                self.n[key] += 1
        return run

    @contextlib.contextmanager
    def wrap(self, patches: list[tuple[Any, str, str | Callable[..., str]]]) -> Iterator[None]:
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
        try:
            for obj, attr, name in patches:
                setattr(obj, attr, self.timed(name, getattr(obj, attr)))
            yield
        finally:
            for obj, attr, old in saved:
                setattr(obj, attr, old)


FORWARD = ("forward, verify (k+1 rows)", "forward, 1 row (plain steps)")


PREFILL = "prefill (not decode)"


def rows_name(self: Any, ids: torch.Tensor, *a: Any, **kw: Any) -> str:
    t = ids.shape[1]
    return FORWARD[1] if t == 1 else FORWARD[0] if t <= K_MAX + 1 else PREFILL


def head_name(self: Any, x: torch.Tensor) -> str:
    return "head, 1 row" if x.dim() == 2 else "head, verify"  # the prefill's ("last") counts as 1 row: see below


def trace_patches(trace: list[str]) -> list[tuple[Any, str, Callable[..., Any]]]:
    """Wrappers that log each decode step's decision: ``o`` the controller chose a plain step, ``e`` nothing was
    proposed, ``kept/drafted`` a verify round."""
    def next_k(fn: Callable[..., int]) -> Callable[..., int]:
        def run(self: Any) -> int:
            k = fn(self)
            trace.append("o" if k == 0 else "?")
            return k
        return run

    def propose(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(self: Any, tokens: list[int], k: int, *a: Any) -> Any:
            d = fn(self, tokens, k, *a)
            if trace[-1] == "?":  # not a shadow guess (those run on the controller's plain steps)
                trace[-1] = "e" if not d.tokens else f"/{len(d.tokens)}"
            return d
        return run

    def accept(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(logits: torch.Tensor, drafts: list[int]) -> Any:
            n, tok = fn(logits, drafts)
            if drafts:
                trace[-1] = f"{n}{trace[-1]}"
            return n, tok
        return run

    def shadow(fn: Callable[..., None]) -> Callable[..., None]:
        def run(self: Any, k: int, kept: int) -> None:
            fn(self, k, kept)
            trace[-1] += f"[{kept}/{k} a={self.alpha:.2f} x{self.best_k()[1]:.2f}]"
        return run

    return [(adaptive.AdaptiveK, "next_k", next_k), (ngram.NgramProposer, "propose", propose),
            (decoder, "greedy_accept", accept), (adaptive.AdaptiveK, "observe_shadow", shadow)]


def profile(llm: LLM, prompt: str, spec: str, max_tokens: int) -> None:
    p = SamplingParams(max_tokens=max_tokens, temperature=0)
    llm.spec_cfg = None
    llm.generate(prompt, p)  # warm
    plain = llm.generate(prompt, p)[0]
    step = plain.metrics["tpot_s"]
    llm.set_spec(spec)
    llm.generate(prompt, p)  # warm the speculative path too
    t = Timers()
    model = llm.model
    patches: list[tuple[Any, str, str | Callable[..., str]]] = [
        (type(model), "forward", rows_name),
        (type(model), "logits", head_name),
        (llama, "DecodePlan", "decode plan rebuilds"),
        (decoder, "greedy_accept", "accept (argmax, compare)"),
        (ContiguousKVCache, "truncate", "cache truncate"),
        (Sequence, "append", "Sequence.append (detokenize, stops)"),
        (ngram.NgramProposer, "propose", "propose"),
        (ngram.NgramProposer, "rollback", "proposer rollback"),
        (adaptive.AdaptiveK, "next_k", "controller"),
        (adaptive.AdaptiveK, "observe_round", "controller"),
        (adaptive.AdaptiveK, "observe_plain", "controller"),
    ]
    with t.wrap(patches):
        out = llm.generate(prompt, p)[0]
    trace: list[str] = []
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in trace_patches(trace)]
    for obj, attr, wrap in trace_patches(trace):
        setattr(obj, attr, wrap(getattr(obj, attr)))
    try:
        llm.generate(prompt, p)
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)
    print("steps (o: controller's plain step, e: no proposal, kept/drafted: a round, [a shadow round: kept/drafted, "
          "alpha, predicted speedup]):", " ".join(trace))
    m = out.metrics
    decode = m["tpot_s"] * (m["output_tokens"] - 1)
    same = out.token_ids == plain.token_ids
    print(f"plain {1 / step:.2f} tok/s (step {step * 1e3:.1f} ms); {spec}: {1 / m['tpot_s']:.2f} tok/s "
          f"x{step / m['tpot_s']:.2f} (timers on), identical {same}, rounds {m['spec_rounds']}, plain steps "
          f"{m['spec_plain_steps']}, tokens/round {m['spec_mean_accepted_length']:.2f}, acceptance "
          f"{m['spec_acceptance_rate']:.2f}, decode {decode * 1e3:.0f} ms")
    # forward's time includes its head and the plan rebuilds it triggers: report them apart. The prefill's
    # forward and head (a "last" row, taken as an average one-row head) come before the decode time.
    parts = dict(t.s)
    prefill = parts.pop(PREFILL, 0.0)
    if t.n.get("head, 1 row"):
        parts["head, 1 row"] -= parts["head, 1 row"] / t.n["head, 1 row"]
    for rows in ("verify", "1 row"):
        fw = next(k for k in FORWARD if rows in k)
        parts[fw] = parts.get(fw, 0.0) - parts.get(f"head, {rows}", 0.0)
    parts[FORWARD[1]] -= parts.get("decode plan rebuilds", 0.0)
    parts["the rest (decoder bookkeeping)"] = decode - sum(parts.values())
    print(f"prefill {prefill * 1e3:.0f} ms (not in decode)")
    print(f"{'part':40s} {'ms':>8s} {'calls':>6s} {'steps':>7s} {'share':>6s}")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"{k:40s} {v * 1e3:8.1f} {t.n.get(k, 0):6d} {v / step:7.2f} {v / decode:6.1%}")
    n_verify = max(t.n.get(FORWARD[0], 0), 1)
    print(f"one verify pass (head included) over one plain step: {t.s.get(FORWARD[0], 0.0) / n_verify / step:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=TARGET)
    ap.add_argument("--spec", default="ngram:k=8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--weights", default="auto", choices=("auto", "stored", "stored-q8", "dequantize"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {model_name()}  threads {args.threads}  load average {os.getloadavg()}")
    from spec_bench import EDIT  # the same edit prompt

    llm = LLM(args.target, weights=args.weights)
    profile(llm, llm.chat_prompt([{"role": "user", "content": EDIT}]), args.spec, args.max_tokens)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
