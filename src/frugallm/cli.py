"""``frugallm`` command line: the subcommand registry (:func:`command`), the option groups and helpers the
commands share (model, techniques, LoRA, sampling; :func:`load_llm`), the parser and :func:`main`. Subcommands live
in ``commands.py`` modules (``frugallm/commands.py``: generate, chat, info, fetch; each subsystem's own), imported
by :func:`build_parser`; user errors exit non-zero with one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from frugallm.errors import FrugalError

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


# Subcommands register themselves when imported: the core ones, then each subsystem's.
PLUGIN_MODULES = ("frugallm.commands", "frugallm.lab.commands", "frugallm.quant.commands", "frugallm.serve.commands")


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
    # ``python -m frugallm.cli``: this file runs as ``__main__``, while the commands modules register on
    # ``frugallm.cli``; run that module's ``main`` so that they are found.
    from frugallm.cli import main as cli_main

    sys.exit(cli_main())
