"""Efficiency-lab subcommands: ``hw probe``, ``roofline``, ``bench``, ``eval``, ``report``.

Imported by :func:`frugallm.cli.build_parser`; every command raises :class:`FrugalError` for user errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from frugallm.cli import add_model_args, command
from frugallm.errors import FrugalError

# ------------------------------------------------------------------------------------------- hw


@command("hw", "hardware ceilings: `hw probe` measures this machine, `hw specs` lists datasheet specs")
def _hw_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="hw_command", metavar="{probe,specs}")
    probe = sub.add_parser("probe", help="measure memory bandwidth and matmul FLOP/s (cached)")
    probe.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when available)")
    probe.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    probe.add_argument("--quick", action="store_true", help="small buffers, 2 runs (smoke test, not for reports)")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=cmd_hw_probe)
    specs = sub.add_parser("specs", help="list the datasheet specs --hw accepts")
    specs.add_argument("--json", action="store_true")
    specs.set_defaults(func=cmd_hw_specs)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def cmd_hw_probe(args: argparse.Namespace) -> int:
    from frugallm.lab import hwprobe

    device = args.device or hwprobe.default_device()
    r = hwprobe.probe_result(device, refresh=args.refresh, quick=args.quick)
    from frugallm import native

    kernels = native.status(build=not args.quick) if device.startswith("cpu") else {}
    if args.json:
        print(json.dumps({**r.to_dict(), "native_kernels": kernels}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{r.spec.name}  ({'quick' if r.quick else 'full'} probe, {r.elapsed_s:.1f} s, "
                    f"cache: {hwprobe.cache_path(device, r.quick)})")
    for col in ("measurement", "value", "size", "samples"):
        t.add_column(col, justify="left" if col in ("measurement", "size") else "right")
    for name, m in r.measurements.items():
        value = f"{m.value:.4g} GB/s" if m.unit == "GB/s" else f"{m.value / 1e9:.4g} GFLOP/s"
        t.add_row(name, value, m.size, str(len(m.samples)))
    for name, why in r.skipped.items():
        t.add_row(name, "skipped", why, "")
    console = Console()
    console.print(t)
    caches = ", ".join(f"{k} {v >> 10} KiB" for k, v in r.cache_bytes.items())
    console.print(f"CPU: {r.cpu_model} ({r.physical_cores} cores / {r.logical_cores} threads; torch threads "
                  f"{r.num_threads}); caches: {caches or 'unknown'}; GPU: {r.gpu_name or 'none'}")
    if kernels:
        console.print("native CPU kernels: " + "; ".join(f"{k} {v}" for k, v in kernels.items()))
    load = "unknown" if r.loadavg_1m is None else f"{r.loadavg_1m:.2f}"
    console.print(f"measured {r.age_s / 3600:.1f} h ago at load average {load}", markup=False)
    for note in r.notes():
        console.print(f"! {note}", markup=False)
    return 0


def cmd_hw_specs(args: argparse.Namespace) -> int:
    from frugallm.lab.hwspecs import DATASHEET_SPECS

    if args.json:
        print(json.dumps({k: s.to_dict() for k, s in DATASHEET_SPECS.items()}, indent=2))
        return 0
    for name, s in DATASHEET_SPECS.items():
        peaks = ", ".join(f"{d} {v / 1e12:.4g} T" for d, v in s.peak_flops.items())
        print(f"{name:16s} {s.mem_bandwidth_gbs:7.0f} GB/s  {peaks}")
    return 0


# ------------------------------------------------------------------------------------------- roofline


@command("roofline", "analytic per-operation roofline of prefill and decode (config only, no weights)")
def _roofline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="default", help="'default', a .gguf, a HF folder or a config .json")
    p.add_argument("--hw", default="local", help="datasheet name (see `hw specs`), local, or a .toml spec")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--wbits", type=int, default=16)
    p.add_argument("--abits", type=int, default=16)
    p.add_argument("--kvbits", type=int, default=16)
    p.add_argument("--compute-dtype", default=None,
                   help="fp32 | bf16 | fp16: decode's matmul dtype (default: fp32 when abits is 32, else fp16)")
    p.add_argument("--prefill-compute-dtype", default=None,
                   help="prefill's matmul dtype when it differs (default: --compute-dtype); frugallm's fp16 "
                        "models on CPU prefill in bf16 where the CPU has AVX512-BF16, else in fp32")
    p.add_argument("--unfused-attention", action="store_true", help="count the score matrix's memory traffic")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a roofline chart")
    p.set_defaults(func=cmd_roofline)


def cmd_roofline(args: argparse.Namespace) -> int:
    from frugallm.lab.hwspecs import load_hw_spec
    from frugallm.lab.peers.base import load_model_config
    from frugallm.lab.roofline import analyze
    from frugallm.lab.roofline_chart import format_table, plot_roofline

    cfg = load_model_config(args.model)
    hw = load_hw_spec(args.hw)
    compute = args.compute_dtype or ("fp32" if args.abits == 32 else "fp16")
    report = analyze(cfg, hw, args.batch, args.prompt_len, args.gen_len, args.wbits, args.abits, args.kvbits,
                     compute, fused_attention=not args.unfused_attention,
                     prefill_compute_dtype=args.prefill_compute_dtype)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(format_table(report))
    if args.plot:
        path = plot_roofline(report, hw, args.plot)
        print(f"wrote {path}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- bench


@command("bench", "measure latency, throughput, memory, MFU/MBU, energy and quality of a configuration or sweep")
def _bench_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.set_defaults(model=None, dtype=None, device=None)
    p.add_argument("--backend", default=None, help="frugallm (default) | transformers | llama.cpp")
    p.add_argument("--quant", default=None, help="frugallm weight quantization spec, e.g. int4:group=32")
    p.add_argument("--kv", default=None, help="frugallm KV-cache policy spec, e.g. snapkv:budget=0.25")
    p.add_argument("--spec", default=None,
                   help="frugallm speculative decoding, e.g. ngram:k=8 or draft:model=qwen2.5-coder-0.5b:k=4; "
                        "the record adds acceptance, the draft's time share and the speedup over the same point "
                        "without it")
    p.add_argument("--batch", type=int, default=None, help="static batch size (default 1)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128)")
    p.add_argument("--gen-len", type=int, default=None, help="generated tokens (default 32)")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1)")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None,
                   help="perplexity, KL and top-1 agreement vs the float32 model (default on)")
    p.add_argument("--corpus", default=None, help="text file for prompts and perplexity (default: builtin)")
    p.add_argument("--quality-windows", type=int, default=4)
    p.add_argument("--quality-window-len", type=int, default=256)
    p.add_argument("--sweep", default=None, metavar="FILE", help="YAML/TOML sweep file")
    p.add_argument("--out", "-o", default=None, help="append records to this JSONL (sweeps default to "
                                                     "<sweep>.results.jsonl and resume from it)")
    p.add_argument("--no-resume", action="store_true", help="re-run points already in --out")
    p.add_argument("--json", action="store_true", help="print the records as JSON lines to stdout")
    p.add_argument("--hw", default=None, help="roofline ceilings: datasheet name or .toml (default: local probe)")
    p.add_argument("--watts-per-core", type=float, default=None,
                   help="power figure of the CPU-time energy estimate (default 10 W)")
    p.add_argument("--endpoint", default=None, metavar="URL", help="benchmark an OpenAI-compatible server")
    p.add_argument("--concurrency", type=int, default=None, help="endpoint: requests in flight (default 1)")
    p.add_argument("--requests", type=int, default=None, help="endpoint: requests to send (default batch x repeat)")
    p.add_argument("--served-model", default=None, help="endpoint: model name to request (default: /v1/models)")
    p.set_defaults(func=cmd_bench)


_POINT_ARGS = ("model", "backend", "dtype", "quant", "kv", "spec", "device", "threads", "batch", "prompt_len",
               "gen_len", "repeat", "warmup", "quality", "corpus", "endpoint", "concurrency", "requests")


def cmd_bench(args: argparse.Namespace) -> int:
    from frugallm.lab import bench, results, sweep
    from frugallm.lab.meters import DEFAULT_WATTS_PER_CORE

    given = {k: getattr(args, k) for k in _POINT_ARGS if getattr(args, k) is not None}
    if args.endpoint:
        given["backend"] = "endpoint"
    settings = bench.BenchSettings(watts_per_core=args.watts_per_core or DEFAULT_WATTS_PER_CORE,
                                   quality_windows=args.quality_windows,
                                   quality_window_len=args.quality_window_len, use_cache=not args.no_cache,
                                   served_model=args.served_model)
    if args.hw:
        from frugallm.lab.hwspecs import load_hw_spec

        settings.hw = load_hw_spec(args.hw)
    if args.sweep:
        points = sweep.expand_sweep(sweep.read_sweep_file(args.sweep), given)
        out = args.out or str(Path(Path(args.sweep).name).with_suffix(".results.jsonl"))
    else:
        points = [{k: given.get(k, getattr(sweep.BenchPoint, k)) for k in sweep.POINT_FIELDS}]
        out = args.out
    records = bench.run_points(points, settings, out=out, resume=bool(args.sweep) and not args.no_resume,
                               progress=sys.stderr.isatty())
    if args.json:
        for r in records:
            print(json.dumps(r))
    else:
        results.print_table(records)
        if out:
            print(f"{len(records)} record(s) appended to {out} ({len(points) - len(records)} already there)")
    errors = [r for r in records if r.get("status") != "ok"]
    if errors and not args.sweep:
        raise FrugalError(errors[0]["error"])
    if errors:
        print(f"{len(errors)} of {len(records)} point(s) failed; see the error records", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------- eval


@command("eval", "quality of a configuration: perplexity/KL vs float32 (ppl) or passkey retrieval (passkey)")
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quant", default=None)
    p.add_argument("--kv", default=None)
    p.add_argument("--task", choices=("ppl", "passkey"), default="ppl")
    p.add_argument("--corpus", default=None, help="ppl: text file (default builtin); passkey: filler source")
    p.add_argument("--windows", type=int, default=4, help="ppl: number of windows")
    p.add_argument("--window-len", type=int, default=256, help="ppl: tokens per window")
    p.add_argument("--context", type=int, default=1024, help="passkey: prompt length in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=2, help="passkey: keys per depth and haystack")
    p.add_argument("--haystacks", default="prose,code,list",
                   help="passkey: filler kinds, any of repeat, prose (pydoc topics or --corpus), code (stdlib "
                        "sources), list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="passkey: plain prompt even if the model has a template")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from frugallm.corpus import load_corpus
    from frugallm.lab import passkey, quality
    from frugallm.lab.peers.frugal import FrugalRunner

    depths = passkey.parse_depths(args.depths) if args.task == "passkey" else []
    stacks = passkey.parse_haystacks(args.haystacks) if args.task == "passkey" else []
    runner = FrugalRunner(args.model, args.dtype, args.device, args.threads, args.quant, args.kv)
    out: dict[str, Any] = {"model": str(runner.path), "dtype": runner.dtype, "quant": args.quant, "kv": args.kv}
    if args.task == "ppl":
        is_ref = runner.dtype == "float32" and not args.quant and not args.kv
        # With --kv the windows run through the generation path, where the policy acts (quality.evaluate_llm).
        ref = quality.frugal_reference_scorer(args.model, runner.device, args.threads)
        q = quality.evaluate_llm(runner.llm, model_key=f"{runner.path.resolve()}|{runner.device}", make_reference=ref,
                                 is_reference=is_ref, corpus_text=load_corpus(args.corpus),
                                 corpus_name=args.corpus or "builtin", windows=args.windows,
                                 window_len=args.window_len)
        out.update(task="ppl", **q.to_dict())
        text = (f"perplexity {q.perplexity:.4f} (NLL {q.nll:.4f}, {q.predictions} predictions) | "
                f"KL vs float32 {q.kl_divergence:.3g} nats | top-1 agreement {q.top1_agreement:.2%}")
        if q.decode_kl_divergence is not None:
            text += (f" | over the {q.windows * (q.window_len - q.decode_from - 1)} decode steps: "
                     f"KL {q.decode_kl_divergence:.3g} nats, top-1 {q.decode_top1_agreement:.2%} ({q.path})")
    else:
        from frugallm import SamplingParams

        llm = runner.llm

        def gen(prompts: list[list[int]], n: int) -> list[str]:
            return [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0))]

        res = passkey.evaluate(gen, runner.tokenizer, context_len=args.context, depths=depths, trials=args.trials,
                               seed=args.seed, chat=not args.no_chat,
                               corpus_text=load_corpus(args.corpus) if args.corpus else None,
                               max_model_len=llm.max_model_len, haystacks=stacks)
        out.update(res)
        counts = res["counts"]
        text = (f"passkey @ {args.context} tokens, kv {args.kv or 'full'}: {counts['all']} needles found | "
                + ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "all"))
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


# ------------------------------------------------------------------------------------------- report


@command("report", "self-contained HTML report (or a Markdown table) from bench JSONL results")
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="JSONL file(s) written by `frugallm bench`")
    p.add_argument("--output", "-o", default="report.html")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table instead of writing HTML")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from frugallm.lab import report
    from frugallm.lab.results import read_records

    records = [r for path in args.results for r in read_records(path)]
    if not records:
        raise FrugalError(f"no records in {', '.join(args.results)}")
    if args.markdown:
        print(report.markdown_table(records))
        return 0
    path = report.write_html(records, args.output)
    print(f"wrote {path} ({len(records)} records)")
    return 0
