"""``frugallm serve``: the OpenAI-compatible server on the continuous-batching engine."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from frugallm import cpu
from frugallm.cli import add_lora_args, add_model_args, command, load_llm, lora_kwargs
from frugallm.errors import FrugalError


@command("serve", "OpenAI-compatible HTTP server with continuous batching (bound to 127.0.0.1 by default)")
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", metavar="MODEL", default=None,
                   help="'default', a .gguf file or a HF folder (same as --model)")
    add_model_args(p)
    add_lora_args(p, serve=True)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every path but /health "
                        "(default: $FRUGALLM_API_KEY if set)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host names accepted, '*' for any (default: on a loopback --host, "
                        "localhost, 127.0.0.1, [::1] and --host, against DNS rebinding; elsewhere any)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: MODEL as given)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step at most")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks in the pool")
    kv.add_argument("--kv-memory-gb", type=float, default=1.0, help="KV-cache pool size in GiB (default 1)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill whole prompts in dedicated steps (running decodes pause meanwhile)")
    p.add_argument("--quant", default=None, help="weight quantization spec applied after loading, e.g. int8, int4")
    p.add_argument("--kv", default=None,
                   help="KV-cache policy of every request, e.g. snapkv:budget=0.25+kivi:bits=2 (under batching: the "
                        "policies of frugallm.kv.paged_names(), an evictor or kivi alone or snapkv+kivi; evicted "
                        "blocks return to the pool, kivi packs older tokens into pool blocks)")
    p.add_argument("--spec", default=None,
                   help="speculative decoding while the server holds at most 2 sequences (e.g. ngram:k=8, "
                        "draft:model=qwen2.5-coder-0.5b:k=4); busier, the engine decodes as without it")
    p.add_argument("--max-body-bytes", type=int, default=2 * 2**20, help="largest accepted request body")
    p.add_argument("--max-queue", type=int, default=None,
                   help="sequences (prompts x n) queued or running at most; past it requests get 429 with "
                        "Retry-After (default 512)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ray = p.add_argument_group("Ray Serve (pip install 'frugallm[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="run --replicas engine replicas behind Ray Serve's HTTP proxy on --host/--port")
    ray.add_argument("--replicas", type=int, default=None, help="engine replicas with --ray (default 1)")
    ray.add_argument("--address", default=None,
                     help="Ray cluster to join with --ray: 'auto' (started by `ray start` on this machine), "
                          "HOST:6379 or ray://HOST:10001 (default: a new local cluster)")
    ray.add_argument("--ray-router", default=None, choices=["prefix", "pow2"],
                     help="with --ray: 'prefix' (default: an adapter's replicas, then the replica that has the "
                          "prompt's prefix, then the less loaded) or 'pow2' (Ray's default: adapters, then load)")
    p.set_defaults(func=cmd_serve)


def build_engine_config(args: argparse.Namespace):  # -> EngineConfig
    from frugallm.engine.llm_engine import EngineConfig

    return EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_blocks=args.num_blocks, kv_memory_gb=args.kv_memory_gb,
        enable_prefix_caching=not args.no_prefix_caching, enable_chunked_prefill=not args.no_chunked_prefill,
        max_model_len=args.max_model_len, kv=args.kv,
    )


def load_served_llm(args: argparse.Namespace) -> Any:
    """The served ``LLM``. The engine applies ``--kv`` itself; a policy ranked by a draft model (speckv) has the LLM
    load that draft and register it for the engine."""
    from frugallm.kv import parse_kv_spec
    from frugallm.kv.speckv import draft_policies

    return load_llm(args, kv=args.kv) if args.kv and draft_policies(parse_kv_spec(args.kv)) else load_llm(args)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise FrugalError("serving needs the 'serve' extra: pip install 'frugallm[serve]'") from None
    from frugallm.engine.async_llm import AsyncLLM
    from frugallm.engine.llm_engine import LLMEngine
    from frugallm.serve.app import create_app, default_allowed_hosts

    if args.model_path is not None:
        args.model = args.model_path
    if not 0 <= args.port <= 65535:
        raise FrugalError(f"--port must be in [0, 65535], got {args.port}")
    if not args.ray and (args.replicas is not None or args.address is not None or args.ray_router is not None):
        raise FrugalError("--replicas, --address and --ray-router need --ray")
    if args.allowed_hosts is not None:
        allowed_hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
        if not allowed_hosts:
            raise FrugalError("--allowed-hosts is empty; list host names, or '*' for any")
    else:
        allowed_hosts = default_allowed_hosts(args.host)
    config = build_engine_config(args)  # validate before the (slow) model load
    from frugallm.spec import parse_spec

    parse_spec(args.spec)
    lora_kwargs(args)  # --lora NAME=PATH specs too
    from frugallm.engine.async_llm import DEFAULT_MAX_QUEUE

    max_queue = DEFAULT_MAX_QUEUE if args.max_queue is None else args.max_queue
    if max_queue < 1:
        raise FrugalError(f"--max-queue must be >= 1, got {max_queue}")
    quant = None
    if args.quant:
        from frugallm.quant import parse_quant_spec

        quant = parse_quant_spec(args.quant)
        if quant.method == "gptq":
            raise FrugalError("--quant gptq needs calibration data; quantize offline and serve the result")
    api_key = args.api_key if args.api_key is not None else os.environ.get("FRUGALLM_API_KEY") or None
    if args.dtype == "auto" and args.device in ("auto", "cpu") and not _cuda():
        # Batched decode is matrix-matrix work. Where the CPU computes bf16 natively, bf16 weights on the native
        # GEMM kernel serve 2.3x the tokens of GGUF blocks run as stored (287.6 vs 126.7 tok/s at concurrency
        # 16, default model, serve_bench): the GGUF kernel decodes each block per row group, bound by its
        # decoding. Elsewhere bf16 is emulated (~40x slower): a GGUF then runs as stored (fp32 activations, a
        # fraction of the memory of any float copy), other models in fp32.
        if cpu.fast_bf16():
            args.dtype = "bfloat16"
        elif not _runs_as_stored(args):
            args.dtype = "float32"
    def build() -> LLMEngine:
        llm = load_served_llm(args)
        if args.spec:
            llm.set_spec(args.spec)  # engine/spec_solo.py: a request alone in the server decodes speculatively
        if quant is not None:
            from frugallm.quant import quantize_model

            quantize_model(llm.model, quant)
        return LLMEngine(llm, config)

    if args.ray:
        return _serve_ray(args, build, api_key, allowed_hosts, max_queue)
    # Loaded in the thread that serves it: one OpenMP pool (see AsyncLLM.launch).
    async_llm = AsyncLLM.launch(build, max_queue=max_queue)
    engine = async_llm.engine
    bm = engine.block_manager
    gib = bm.num_blocks * engine.cache.bytes_per_block / 2**30
    name = args.served_model_name or args.model
    print(f"frugallm: serving {name!r} on http://{args.host}:{args.port}/v1 | KV pool {bm.num_blocks} blocks x "
          f"{bm.block_size} tokens ({gib:.2f} GiB) | max_model_len {engine.max_model_len} | "
          f"max_num_seqs {config.max_num_seqs} | chunked prefill {config.enable_chunked_prefill} | "
          f"prefix caching {config.enable_prefix_caching} | api key {'on' if api_key else 'off'}", file=sys.stderr)
    app = create_app(async_llm, name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                     allowed_hosts=allowed_hosts)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        async_llm.shutdown()
    return 0


def _serve_ray(args: argparse.Namespace, build: Callable[[], Any], api_key: str | None,
               allowed_hosts: list[str] | None, max_queue: int) -> int:
    """``serve --ray``: the same app in ``--replicas`` Ray Serve replicas, each built by ``build`` (pickled to them)."""
    try:
        from frugallm.serve.ray_app import RayServeOptions, serve_forever
    except ImportError:
        raise FrugalError("--ray needs the 'ray' extra: pip install 'frugallm[ray]'") from None
    if args.address is None:  # the replicas run on this machine: a missing model is an error now, not after Ray's
        from frugallm.loading import resolve_model_path  # retries of every replica

        resolve_model_path(args.model)
    gpu = args.device.startswith("cuda") or (args.device == "auto" and _cuda())
    options = RayServeOptions(
        args.served_model_name or args.model, replicas=1 if args.replicas is None else args.replicas,
        api_key=api_key, max_body_bytes=args.max_body_bytes, max_queue=max_queue,
        allowed_hosts=None if allowed_hosts is None else tuple(allowed_hosts),
        replica_cpus=float(args.threads or 1), replica_gpus=1.0 if gpu else 0.0, router=args.ray_router or "prefix")
    return serve_forever(build, options, address=args.address, host=args.host, port=args.port)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _runs_as_stored(args: argparse.Namespace) -> bool:
    """Whether ``LLM`` would run this model's weights as stored with dtype auto (a GGUF on CPU, no --quant)."""
    import torch

    from frugallm.loading import choose_weights

    return choose_weights(args.model, "auto", "auto", torch.device("cpu"), quant=bool(args.quant))[0] == "stored"
