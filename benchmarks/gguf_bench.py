"""GGUF files run as shipped: frugallm against llama.cpp on the same file, same threads, in one run.

Each (model, engine) pair runs in its own subprocess, so peak RSS is that engine's alone (load, a 512-token
prompt, then generated tokens). Measured: load time, prefill tok/s (512 tokens / time to first token), decode
tok/s (median of 1 / TPOT over rounds), peak RSS, decode MBU (weight bytes read per token / the probed memory
bandwidth) and, with ``--ppl``, perplexity on the built-in corpus scored on the same token windows by both.

    python benchmarks/gguf_bench.py --models default,qwen2.5-coder-1.5b --threads 2 --ppl
    python benchmarks/gguf_bench.py --make-synthetic /tmp/llama3-8b-q4k.gguf   # 8B Llama-3 shapes, Q4_K
    python benchmarks/gguf_bench.py --models /tmp/llama3-8b-q4k.gguf --rounds 2 --gen 16
    FRUGALLM_ISA=avx2 python benchmarks/gguf_bench.py ...   # frugallm's AVX2 kernels on an AVX-512 machine
    python benchmarks/gguf_bench.py --engines frugallm,frugallm-q8,llama.cpp --ppl   # + int8 activations

Engine ``frugallm-q8`` is frugallm with its GGUF linears quantizing decode's activations to int8 per 32 values
(``weights="stored-q8"``, ``csrc/gguf_q8.cpp``: llama.cpp's arithmetic, not exact); prefill stays exact (bf16 /
fp32 dequantize-then-GEMM). Its perplexity runs every position through the int8 kernel, as llama.cpp's does.

The synthetic model has Llama-3-8B's shapes (32 layers, hidden 4096, 32/8 heads, FFN 14336) with random Q4_K
blocks (Q6_K head) and Qwen2.5's tokenizer (vocabulary 151,936 instead of 128,256: 8.2B parameters); its
text is noise, its speed and memory are those of a real file of that size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS = 512


def _ids(tokenizer: object, n: int) -> list[int]:
    from frugallm.corpus import builtin_corpus

    ids = tokenizer.encode(builtin_corpus()[:20 * n])  # type: ignore[attr-defined]
    return ids[:n]


def _weight_bytes_per_token(path: Path) -> int:
    """Bytes of the weights one decode step reads: every matrix, the embedding table only as the head."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(v for k, v in tensors.items() if k != "token_embd.weight")
    return total + (tensors.get("token_embd.weight", 0) if "output.weight" not in tensors else 0)


def _llama_cpp_nll(llm: object, windows: list[list[int]]) -> tuple[float, int]:
    import numpy as np

    nll, count = 0.0, 0
    for w in windows:
        llm.reset()  # type: ignore[attr-defined]
        llm.eval(w)  # type: ignore[attr-defined]
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)  # type: ignore[attr-defined]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll -= float(sum(logits[i, w[i + 1]] - logz[i] for i in range(len(w) - 1)))
        count += len(w) - 1
    return nll, count


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from frugallm.lab.peers import make_runner
    from frugallm.quant.gguf_linear import set_act_quant

    out: dict = {"model": args.model, "engine": args.engine}
    q8 = args.engine == "frugallm-q8"
    t0 = time.perf_counter()
    runner = make_runner("frugallm" if q8 else args.engine, args.model, threads=args.threads,
                         n_ctx=PROMPT_TOKENS + args.gen + 64, weights="stored-q8" if q8 else "auto")
    out["load_s"] = time.perf_counter() - t0
    ids = _ids(runner.tokenizer, PROMPT_TOKENS)
    first = runner.generate([ids], args.gen).requests[0]  # the 512-token prompt, then generated tokens
    out["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ttfts, tps = [first.ttft_s], [1 / first.tpot_s] if first.tpot_s else []
    for _ in range(args.rounds - 1):
        r = runner.generate([ids], args.gen).requests[0]
        ttfts.append(r.ttft_s)
        if r.tpot_s:
            tps.append(1 / r.tpot_s)
    out["prefill_tok_s"] = PROMPT_TOKENS / statistics.median(ttfts)
    out["decode_tok_s"] = statistics.median(tps)
    if args.engine.startswith("frugallm"):
        info = runner.llm.loaded.source_info  # type: ignore[attr-defined]
        out["weights"] = "stored-q8" if q8 else info.get("weights", runner.dtype)
        out["isa"] = __import__("frugallm.cpu", fromlist=["level"]).level()
    if args.ppl:
        from frugallm.corpus import builtin_corpus
        from frugallm.lab.quality import corpus_windows, perplexity, window_logprobs

        wins = corpus_windows(runner.tokenizer, builtin_corpus(), args.ppl_windows, args.ppl_len)
        if args.engine.startswith("frugallm"):
            if q8:  # every position through the int8 kernel, not only decode's few rows
                set_act_quant(runner.llm.model, "q8", max_rows=1 << 20)  # type: ignore[attr-defined]
            ppl, _, count = perplexity(window_logprobs(runner.score, wins), wins)
        else:
            import llama_cpp

            llm = llama_cpp.Llama(model_path=str(runner.path), n_ctx=args.ppl_len + 8, n_threads=args.threads,
                                  n_threads_batch=args.threads, n_batch=512, logits_all=True, verbose=False)
            nll, count = _llama_cpp_nll(llm, wins)
            ppl = float(__import__("math").exp(nll / count))
        out["ppl"], out["ppl_tokens"] = ppl, count
    return out


def make_synthetic(path: Path, layers: int = 32) -> None:
    """Write Llama-3-8B-shaped random Q4_K weights (Q6_K head) with Qwen2.5-Coder's tokenizer to ``path``."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader, GGUFWriter

    from frugallm.loading import resolve_model_path

    src = GGUFReader(resolve_model_path("qwen2.5-coder-1.5b"))
    hidden, ffn, heads, kv_heads, head_dim = 4096, 14336, 32, 8, 128
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(0)

    def blocks(rows: int, cols: int, qtype: Q) -> np.ndarray:
        block, nbytes = {Q.Q4_K: (256, 144), Q.Q6_K: (256, 210)}[qtype]
        raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
        scale = (rng.uniform(2e-5, 2e-4, size=(rows, cols // block))).astype(np.float16).view(np.uint8)
        if qtype == Q.Q4_K:  # d and dmin lead the block
            raw[..., 0:2] = scale.reshape(rows, -1, 2)
            raw[..., 2:4] = scale.reshape(rows, -1, 2)
        else:  # Q6_K: d closes it
            raw[..., 208:210] = scale.reshape(rows, -1, 2)
        return raw.reshape(rows, -1)

    w = GGUFWriter(str(path), "llama")
    w.add_name("synthetic Llama-3-8B shapes (random Q4_K)")
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        f = src.fields.get(key)
        if f is not None:
            v = f.contents()
            w.add_key_value(key, v, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)

    def mat(name: str, rows: int, cols: int, qtype: Q = Q.Q4_K) -> None:
        w.add_tensor(name, blocks(rows, cols, qtype), raw_dtype=qtype)  # uint8 [rows, bytes]: shape derived

    mat("token_embd.weight", vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        mat(p + "attn_q.weight", heads * head_dim, hidden)
        mat(p + "attn_k.weight", kv_heads * head_dim, hidden)
        mat(p + "attn_v.weight", kv_heads * head_dim, hidden)
        mat(p + "attn_output.weight", hidden, heads * head_dim)
        mat(p + "ffn_gate.weight", ffn, hidden)
        mat(p + "ffn_up.weight", ffn, hidden)
        mat(p + "ffn_down.weight", hidden, ffn)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    mat("output.weight", vocab, hidden, Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _bandwidth_gbs() -> float | None:
    try:
        from frugallm.lab.hwprobe import probe_result

        m = probe_result("cpu", quick=True).measurements
        return max(v.value for k, v in m.items() if v.unit == "GB/s")
    except Exception:  # noqa: BLE001 - MBU is reported as unknown
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="default,qwen2.5-coder-1.5b")
    ap.add_argument("--engines", default="frugallm,llama.cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128, help="generated tokens per round")
    ap.add_argument("--ppl", action="store_true", help="also perplexity on the built-in corpus (same windows)")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--make-synthetic", type=Path, help="write the synthetic 8B Q4_K GGUF here and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_synthetic:
        make_synthetic(args.make_synthetic)
        print(f"wrote {args.make_synthetic} ({args.make_synthetic.stat().st_size / 2**30:.2f} GiB)")
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    import torch

    from frugallm import cpu
    from frugallm.loading import resolve_model_path

    rows = []
    for model in args.models.split(","):
        for engine in args.engines.split(","):
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--engine", engine, "--threads",
                   str(args.threads), "--rounds", str(args.rounds), "--gen", str(args.gen), "--ppl-windows",
                   str(args.ppl_windows), "--ppl-len", str(args.ppl_len)] + (["--ppl"] if args.ppl else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{model} / {engine} failed: {p.stderr.strip()[-400:]}", file=sys.stderr)
                continue
            r = json.loads(line[7:])
            r["bytes_per_token"] = _weight_bytes_per_token(resolve_model_path(model))
            rows.append(r)
    bw = _bandwidth_gbs()
    flags = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16") if f in cpu.flags())
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = "not installed"
    print(f"CPU: {cpu.model_name()} ({flags}); frugallm ISA level {cpu.level()}; {args.threads} threads; "
          f"torch {torch.__version__}; llama-cpp-python {llama_version}; {platform.python_version()}; "
          f"probed bandwidth {bw or 0:.1f} GB/s; load average {os.getloadavg()[0]:.2f}")
    print("| model | engine | weights | load s | prefill tok/s (512) | decode tok/s | decode MBU | peak RSS GiB "
          "| ppl | x llama.cpp (prefill / decode / RSS) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    ref = {r["model"]: r for r in rows if r["engine"] == "llama.cpp"}
    for r in rows:
        mbu = f"{r['decode_tok_s'] * r['bytes_per_token'] / (bw * 1e9):.0%}" if bw else "-"
        base = ref.get(r["model"])
        ratio = (f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f} / {r['decode_tok_s'] / base['decode_tok_s']:.2f}"
                 f" / {r['rss_gib'] / base['rss_gib']:.2f}") if base and base is not r else "-"
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else "-"
        print(f"| {Path(r['model']).name} | {r['engine']} | {r.get('weights', 'gguf')} | {r['load_s']:.1f} "
              f"| {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {mbu} | {r['rss_gib']:.2f} | {ppl} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
