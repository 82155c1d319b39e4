"""Serving benchmark: ``frugallm serve`` under load on 127.0.0.1.

Starts the server as a subprocess (once with chunked prefill, once without), then drives it with
streaming ``/v1/completions`` requests of ``--prompt-len`` token-id prompts (distinct corpus slices, so no
prefix-cache hits between them) and exactly ``--output-len`` greedy output tokens (``ignore_eos``).

Reports, per run: output tokens/s (all output tokens / wall time), TTFT p50/p99, mean TPOT, CPU ms per
output token (server, its event-loop thread alone, and this load generator, which shares the machine:
it speaks HTTP/1.1 over raw asyncio streams and JSON-decodes only the usage event); the speed-up of
concurrency 16 over concurrency 1 (the engine's own single-stream decode); prefix caching: the TTFT of a
second request sharing a ``--system-prompt-len``-token prefix with a first one; and, when
``llama-cpp-python`` is installed, llama.cpp's single-stream decode tok/s on the same GGUF.

    python benchmarks/serve_bench.py --threads 1 --out serve_bench.json
    python benchmarks/serve_bench.py --threads 2 --requests 64 --c1-requests 8 --quick  # main runs only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: argparse.Namespace, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from frugallm.cli import main; raise SystemExit(main())", "serve", args.model,
               "--port", str(self.port), "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--log-level", "warning", *extra]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.weights:
            cmd += ["--weights", args.weights]
        self.cmd = cmd

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start in 300 s")
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(url: str, prompt: list[int] | str, max_tokens: int) -> dict[str, float]:
    """One streaming completion over a raw asyncio connection: the load generator shares the CPU with the
    server, so it parses no more than it must (HTTP/1.1 chunked framing, and JSON only for the usage event).
    """
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(body)) + body)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP error: {status!r} {await reader.read(500)!r}")
    while (await reader.readline()) not in (b"\r\n", b""):  # headers
        pass
    ttft = None
    tokens = 0
    buf = b""
    while size := int((await reader.readline()).strip() or b"0", 16):  # chunked transfer encoding
        buf += (await reader.readexactly(size + 2))[:-2]
        *events, buf = buf.split(b"\n\n")
        for ev in events:
            if ttft is None and b'"text":' in ev:
                ttft = time.perf_counter() - t0
            elif b'"choices":[]' in ev or b'"choices": []' in ev:  # the usage event
                tokens = json.loads(ev[len(b"data: "):])["usage"]["completion_tokens"]
    writer.close()
    e2e = time.perf_counter() - t0
    ttft = ttft if ttft is not None else e2e
    return {"ttft": ttft, "e2e": e2e, "tokens": tokens, "tpot": (e2e - ttft) / max(tokens - 1, 1)}


async def run_load(url: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(p: list[int]) -> dict[str, float]:
        async with sem:
            return await one_request(url, p, max_tokens)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(guarded(p) for p in prompts))
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    total = sum(r["tokens"] for r in results)

    def pct(q: float) -> float:
        return ttfts[min(len(ttfts) - 1, round(q * (len(ttfts) - 1)))]

    return {"concurrency": concurrency, "requests": len(prompts), "wall_s": wall, "output_tokens": total,
            "output_tok_s": total / wall, "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99),
            "tpot_mean_s": statistics.mean(r["tpot"] for r in results),
            "single_stream_decode_tok_s": statistics.mean(1 / r["tpot"] for r in results) if concurrency == 1 else None}


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(whole process, main thread) CPU seconds of ``pid`` from /proc (None where there is no /proc).

    The server's main thread runs the event loop (HTTP, SSE); the engine thread and torch's workers
    are the rest.
    """
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    try:
        return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")
    except OSError:
        return None


def measured(url: str, pid: int, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict[str, Any]:
    """``run_load`` plus where the CPU went, per output token: server (all, event loop) and this client."""
    c0, r0 = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
    r = asyncio.run(run_load(url, prompts, max_tokens, concurrency))
    c1, r1 = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
    n = max(r["output_tokens"], 1)
    if c0 and c1:
        r["server_cpu_ms_per_token"] = (c1[0] - c0[0]) / n * 1e3
        r["server_event_loop_cpu_ms_per_token"] = (c1[1] - c0[1]) / n * 1e3
    r["client_cpu_ms_per_token"] = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n * 1e3
    r["load_avg"] = os.getloadavg()
    return r


async def prefix_ttft(url: str, system: list[int], questions: list[list[int]]) -> list[float]:
    out = []
    for q in questions:  # one after the other: the second finds the first's blocks
        out.append((await one_request(url, system + q, 1))["ttft"])
    return out


def llamacpp_single_stream(args: argparse.Namespace, prompt: list[int]) -> float | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    from frugallm.loading import default_model_path

    path = default_model_path() if args.model == "default" else args.model
    if not str(path).endswith(".gguf"):
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=args.threads or os.cpu_count(), verbose=False)
    gen = llm.generate(prompt, temp=0.0)
    next(gen)  # prefill and the first token
    t0 = time.perf_counter()
    n = 0
    for _ in gen:
        n += 1
        if n >= args.output_len - 1:
            break
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: torch's)")
    ap.add_argument("--weights", choices=["auto", "stored", "stored-q8", "dequantize"], default=None,
                    help="the server's --weights (a GGUF's quantized weights; default: serve's own)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--c1-requests", type=int, default=None, help="requests at concurrency 1 (default: --requests)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--system-prompt-len", type=int, default=1000)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="skip the no-prefix-caching and no-chunked-prefill servers")
    args = ap.parse_args()

    from frugallm import LLM
    from frugallm.corpus import builtin_corpus

    tok = LLM(args.model, device="cpu").tokenizer
    ids = tok.encode(builtin_corpus())
    need = args.requests * args.prompt_len + args.system_prompt_len + 64
    while len(ids) < need:
        ids = ids + ids
    prompts = [ids[i * args.prompt_len:(i + 1) * args.prompt_len] for i in range(args.requests)]
    system = ids[-args.system_prompt_len - 64:-64]
    questions = [ids[-64:-32], ids[-32:]]
    c1_prompts = prompts[: args.c1_requests or args.requests]
    results: dict[str, Any] = {"model": args.model, "threads": args.threads, "prompt_len": args.prompt_len,
                               "output_len": args.output_len, "cpu_count": os.cpu_count(),
                               "load_avg_start": os.getloadavg()}

    def show(name: str, r: dict[str, Any]) -> None:
        cpu = (f" | CPU ms/token: server {r['server_cpu_ms_per_token']:.2f} (event loop "
               f"{r['server_event_loop_cpu_ms_per_token']:.2f}), client {r['client_cpu_ms_per_token']:.2f}"
               if "server_cpu_ms_per_token" in r else "")
        print(f"{name:32s} {r['output_tok_s']:8.1f} out tok/s | TTFT p50 {r['ttft_p50_s']:6.2f}s "
              f"p99 {r['ttft_p99_s']:6.2f}s | TPOT {r['tpot_mean_s'] * 1e3:6.1f} ms | wall {r['wall_s']:.0f}s{cpu} "
              f"| load {r['load_avg'][0]:.1f}", flush=True)

    with ServerProcess(args) as srv:
        first, second = asyncio.run(prefix_ttft(srv.url, system, questions))
        results["prefix_cache"] = {"system_prompt_tokens": len(system), "ttft_first_s": first,
                                   "ttft_second_s": second, "speedup": first / second}
        print(f"prefix caching: {len(system)}-token shared prefix, TTFT first {first:.3f}s, second {second:.3f}s "
              f"({first / second:.1f}x)", flush=True)
        asyncio.run(run_load(srv.url, prompts[:2], 4, 2))  # warm-up
        r1 = measured(srv.url, srv.proc.pid, c1_prompts, args.output_len, 1)
        show("concurrency 1", r1)
        rc = measured(srv.url, srv.proc.pid, prompts, args.output_len, args.concurrency)
        show(f"concurrency {args.concurrency} (chunked prefill)", rc)
        results["c1"], results["chunked"] = r1, rc
    if not args.quick:
        with ServerProcess(args, "--no-prefix-caching") as srv:
            first, second = asyncio.run(prefix_ttft(srv.url, system, questions))
            results["prefix_cache_off"] = {"ttft_first_s": first, "ttft_second_s": second}
            print(f"prefix caching off: TTFT first {first:.3f}s, second {second:.3f}s", flush=True)
        with ServerProcess(args, "--no-chunked-prefill") as srv:
            asyncio.run(run_load(srv.url, prompts[:2], 4, 2))
            rn = measured(srv.url, srv.proc.pid, prompts, args.output_len, args.concurrency)
            show(f"concurrency {args.concurrency} (no chunked prefill)", rn)
            results["unchunked"] = rn
    results["speedup_vs_single_stream"] = results["chunked"]["output_tok_s"] / r1["single_stream_decode_tok_s"]
    print(f"concurrency {args.concurrency} output tok/s / engine single-stream decode tok/s: "
          f"{results['speedup_vs_single_stream']:.2f}x", flush=True)
    lc = llamacpp_single_stream(args, prompts[0])
    results["llamacpp_single_stream_tok_s"] = lc
    if lc:
        print(f"llama.cpp single-stream decode: {lc:.1f} tok/s -> concurrency {args.concurrency} is "
              f"{results['chunked']['output_tok_s'] / lc:.2f}x", flush=True)
    results["load_avg_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
