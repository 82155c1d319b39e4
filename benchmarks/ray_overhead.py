"""What Ray Serve adds per request: the same model, engine settings and requests through ``frugallm serve`` (plain
uvicorn) and ``frugallm serve --ray`` (Ray's HTTP proxy -> ingress replica -> engine replica), side by side.

Both servers run as subprocesses on 127.0.0.1 for the whole run, with the same ``--threads`` (the Ray replica gets
as many CPUs). Requests are the lab's load generator (``frugallm.lab.endpoint.run_load``, what ``frugallm bench
--endpoint`` sends: streaming ``/v1/completions``, greedy, exactly ``max_tokens`` tokens). For each (max_tokens,
concurrency) point the servers take turns, ``--rounds`` rounds of ``--requests`` requests each (plain, Ray, plain,
Ray, ...), so drift on the machine hits both. Reported per point: median TTFT, median end-to-end latency, median
TPOT, output tok/s, and Ray minus plain for the medians (the added latency per request; at ``max_tokens 1`` it is
the routing and relay cost alone, the TPOT difference is the per-token cost of streaming through two more hops).

    python benchmarks/ray_overhead.py --threads 2 --out ray_overhead.jsonl
    python benchmarks/ray_overhead.py --threads 2 --router pow2 --out ray_overhead.jsonl  # Ray's default router
    python benchmarks/ray_overhead.py --model qwen2.5-coder-0.5b --max-tokens 1,64 --concurrency 1,8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from frugallm.corpus import builtin_corpus
from frugallm.lab.endpoint import run_load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``frugallm serve`` in a subprocess (stderr to a temp file: Ray logs a lot), ready once ``/health`` is 200."""

    def __init__(self, name: str, args: argparse.Namespace, *extra: str) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-c", "from frugallm.cli import main; raise SystemExit(main())", "serve",
                    args.model, "--port", str(self.port), "--dtype", args.dtype, "--threads", str(args.threads),
                    "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning", *extra]

    def __enter__(self) -> Server:
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"ray_overhead_{self.name}_", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited; its log: {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{self.name} server did not become healthy; its log: {self.log.name}")
            time.sleep(1)

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)  # --ray removes its application and stops its local Ray cluster
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def prompts(n: int, words: int) -> list[str]:
    """``n`` distinct prompts of ``words`` words (corpus windows: no two share a prefix-cache block)."""
    text = builtin_corpus().split()
    step = max(words, len(text) // max(n, 1))
    return [" ".join(text[i * step: i * step + words]) for i in range(n)]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def point(server: Server, ps: list[str], max_tokens: int, concurrency: int, requests: int) -> dict[str, Any]:
    results, wall = run_load(server.url, ps, max_tokens=max_tokens, concurrency=concurrency, requests=requests)
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    return {"ttft": [r.ttft_s for r in ok], "e2e": [r.e2e_s for r in ok],
            "tpot": [r.tpot_s for r in ok if r.tpot_s is not None], "tokens": sum(r.output_tokens for r in ok),
            "wall": wall, "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="engine threads of each server")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=1, help="Ray engine replicas (1: same hardware as the plain one)")
    ap.add_argument("--router", default="prefix", choices=["prefix", "pow2"], help="serve --ray-router")
    ap.add_argument("--max-tokens", default="1,32", help="comma-separated output lengths")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated requests in flight")
    ap.add_argument("--requests", type=int, default=24, help="requests per server per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--out", default=None, help="append one JSON record per point to this file")
    args = ap.parse_args()
    lengths = [int(x) for x in args.max_tokens.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]
    ps = prompts(args.requests, args.prompt_words)
    ray_args = ("--ray", "--replicas", str(args.replicas), "--ray-router", args.router)
    with Server("plain", args) as plain, Server("ray", args, *ray_args) as ray:
        for srv in (plain, ray):  # warm-up: first-request costs (kernels, Ray's routing state) are not measured
            run_load(srv.url, ps[:2], max_tokens=4, concurrency=1, requests=4)
        print(f"{'max_tokens':>10} {'conc':>4} {'server':>6} {'ttft_ms':>8} {'e2e_ms':>8} {'tpot_ms':>8} "
              f"{'tok/s':>7} {'errors':>6}")
        for max_tokens in lengths:
            for conc in levels:
                acc: dict[str, dict[str, Any]] = {s.name: {"ttft": [], "e2e": [], "tpot": [], "tokens": 0,
                                                           "wall": 0.0, "errors": []} for s in (plain, ray)}
                for _ in range(args.rounds):
                    for srv in (plain, ray):
                        r = point(srv, ps, max_tokens, conc, args.requests)
                        a = acc[srv.name]
                        for k in ("ttft", "e2e", "tpot", "errors"):
                            a[k] += r[k]
                        a["tokens"] += r["tokens"]
                        a["wall"] += r["wall"]
                record: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "threads": args.threads,
                                          "replicas": args.replicas, "router": args.router, "max_tokens": max_tokens,
                                          "concurrency": conc,
                                          "requests": args.requests * args.rounds}
                for name, a in acc.items():
                    med = {k: median(a[k]) for k in ("ttft", "e2e", "tpot")}
                    tps = a["tokens"] / a["wall"] if a["wall"] else None
                    record[name] = {**{f"{k}_median_s": v for k, v in med.items()}, "tokens_per_s": tps,
                                    "errors": len(a["errors"]), "first_error": a["errors"][0] if a["errors"] else None}
                    ms = [f"{v * 1e3:8.2f}" if v is not None else f"{'-':>8}" for v in med.values()]
                    print(f"{max_tokens:>10} {conc:>4} {name:>6} {' '.join(ms)} {tps or 0:7.1f} {len(a['errors']):>6}")
                record["added_s"] = {k: (record["ray"][f"{k}_median_s"] - record["plain"][f"{k}_median_s"])
                                     if record["ray"][f"{k}_median_s"] is not None
                                     and record["plain"][f"{k}_median_s"] is not None else None
                                     for k in ("ttft", "e2e", "tpot")}
                added = "  ".join(f"{k} {v * 1e3:+.2f} ms" for k, v in record["added_s"].items() if v is not None)
                print(f"{'':>10} {'':>4} {'added':>6} {added}")
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
