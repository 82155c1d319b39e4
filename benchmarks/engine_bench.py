"""Side-by-side engine benchmark on the default model: frugallm vs transformers (vs llama.cpp if installed).

Batch 1, greedy, same prompt token ids, same thread count. For each engine, in its own subprocess (so
peak RSS belongs to that engine alone):

* load time: ``cold`` = first load (frugallm: converting the GGUF, without the converted-weights cache)
  and ``cached`` = a later load (frugallm: from its weights cache; llama.cpp: file in the page cache;
  transformers has no such cache, so none). The OS page cache is warm for both.
* decode tok/s = 1 / TPOT generating ``--gen-len`` tokens after a 32-token prompt;
* prefill tok/s = ``--prefill-len`` / TTFT of a ``--prefill-len``-token prompt;
* peak RSS of the worker process (loads included).

Medians of ``--runs`` runs after one warm-up. Prints a Markdown table, the ratios and machine info;
``--json`` prints one JSON document instead. Uses :mod:`frugallm.lab.bench` and
:mod:`frugallm.lab.peers` for prompts, runners and RSS, so numbers match ``frugallm bench``.

    .venv/bin/python benchmarks/engine_bench.py [--runs 3] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ENGINES: dict[str, dict[str, str]] = {
    "frugallm": {"backend": "frugallm", "dtype": "auto"},
    "frugallm-fp32": {"backend": "frugallm", "dtype": "float32"},
    "transformers-fp32": {"backend": "transformers", "dtype": "auto"},  # GGUF dequantized to fp32
    "llama.cpp": {"backend": "llama.cpp", "dtype": "auto"},
}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one engine in this process."""
    from frugallm.corpus import builtin_corpus
    from frugallm.lab.bench import peak_rss_bytes, synthetic_prompts
    from frugallm.lab.peers import BACKENDS, make_runner

    spec = ENGINES[args.worker]
    out: dict[str, Any] = {"engine": args.worker, "backend": spec["backend"]}
    why = BACKENDS[spec["backend"]].missing()
    if why:
        return {**out, "error": why}
    kw = {"dtype": spec["dtype"], "device": "cpu", "threads": args.threads}
    runner = make_runner(spec["backend"], args.model, use_cache=False, **kw)
    out["load_cold_s"] = runner.load_s
    if spec["backend"] == "transformers":
        out["load_cached_s"] = None  # no converted-weights cache: a second load repeats the first
    else:
        for _ in range(2 if spec["backend"] == "frugallm" else 1):  # frugallm: the 1st may write the cache
            runner.close()
            runner = make_runner(spec["backend"], args.model, **kw)
        out["load_cached_s"] = runner.load_s
    import torch

    out.update(dtype=runner.dtype, threads=torch.get_num_threads())
    corpus = builtin_corpus()
    short = synthetic_prompts(runner.tokenizer, corpus, 1, 32)
    long = synthetic_prompts(runner.tokenizer, corpus, 1, args.prefill_len)
    runner.generate(short, 8)  # warm-up
    runner.generate(long, 1)
    tpots, ttfts = [], []
    for _ in range(args.runs):
        tpots.append(runner.generate(short, args.gen_len).requests[0].tpot_s)
        ttfts.append(runner.generate(long, 1).requests[0].ttft_s)
    out.update(decode_tok_s=1 / statistics.median(tpots), decode_tok_s_runs=[1 / t for t in tpots],
               prefill_tok_s=args.prefill_len / statistics.median(ttfts),
               prefill_tok_s_runs=[args.prefill_len / t for t in ttfts], peak_rss_mb=peak_rss_bytes() / 1e6)
    return out


def _run_worker(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model", args.model, "--runs",
           str(args.runs), "--gen-len", str(args.gen_len), "--prefill-len", str(args.prefill_len)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"engine": engine, "error": f"worker failed (exit {proc.returncode}): {tail}"}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0}


def _f(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = ["engine", "dtype", "threads", f"decode tok/s ({args.gen_len} tok)",
            f"prefill tok/s ({args.prefill_len} tok)", "load cold s", "load cached s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | skipped: {r['error']} |" + " |" * (len(head) - 2))
            continue
        lines.append(f"| {r['engine']} | {r['dtype']} | {r['threads']} | {_f(r['decode_tok_s'])} | "
                     f"{_f(r['prefill_tok_s'])} | {_f(r['load_cold_s'], '.2f')} | {_f(r['load_cached_s'], '.2f')} | "
                     f"{_f(r['peak_rss_mb'], '.0f')} |")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    by = {r["engine"]: r for r in rows if "error" not in r}

    def ratio(a: str, b: str, key: str) -> float | None:
        return by[a][key] / by[b][key] if a in by and b in by else None

    return {"frugallm decode / transformers decode": ratio("frugallm", "transformers-fp32", "decode_tok_s"),
            "frugallm-fp32 decode / transformers decode": ratio("frugallm-fp32", "transformers-fp32", "decode_tok_s"),
            "frugallm prefill / transformers prefill": ratio("frugallm", "transformers-fp32", "prefill_tok_s"),
            "frugallm prefill / llama.cpp prefill": ratio("frugallm", "llama.cpp", "prefill_tok_s"),
            "frugallm decode / llama.cpp decode": ratio("frugallm", "llama.cpp", "decode_tok_s")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: torch's)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {', '.join(ENGINES)}")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    from frugallm.lab.results import git_commit, machine_info, package_versions

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {', '.join(unknown)}; valid: {', '.join(ENGINES)}")
    load0 = os.getloadavg()[0]
    rows = []
    for e in engines:
        print(f"running {e} ...", file=sys.stderr)
        rows.append(_run_worker(e, args))
    doc = {"rows": rows, "ratios": ratios(rows), "machine": machine_info(None), "versions": package_versions(),
           "git_commit": git_commit(), "loadavg_1m": {"start": load0, "end": os.getloadavg()[0]},
           "settings": {"model": args.model, "runs": args.runs, "gen_len": args.gen_len,
                        "prefill_len": args.prefill_len, "batch": 1, "greedy": True}}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(markdown(rows, args))
    print()
    for name, value in doc["ratios"].items():
        print(f"- {name}: {'n/a' if value is None else f'{value:.2f}x'}")
    m = doc["machine"]
    print(f"\nMachine: {m['cpu_model']}, {m['logical_cores']} logical cores; {m['platform']}; "
          f"load average {load0:.1f} -> {doc['loadavg_1m']['end']:.1f} (other processes compete when > 0); "
          f"versions: {', '.join(f'{k} {v}' for k, v in doc['versions'].items() if v)}; "
          f"commit {doc['git_commit'] or 'unknown'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
