"""``frugallm quantize MODEL --quant SPEC -o DIR``: quantize once, store packed (see ``storage.py``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from frugallm.cli import add_model_args, command
from frugallm.engine.llm import LLM, resolve_dtype
from frugallm.errors import FrugalError
from frugallm.loading import resolve_model_path
from frugallm.quant.spec import parse_quant_spec
from frugallm.quant.storage import is_quantized_folder, save_quantized, source_hash


@command("quantize", "quantize a model's weights and write a packed safetensors folder (load it like a model)")
def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=None, help="model to quantize (same as --model)")
    add_model_args(p)
    # add_model_args takes no technique options (add_technique_args does, for generate/chat), so they are ours.
    p.add_argument("--quant", default=None, help="quantization spec, e.g. int8, int4:group=32, gptq:bits=4")
    p.add_argument("--calib", default=None, help="calibration text file for gptq (default: built-in corpus)")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--store-dtype", default="float16",
                   help="dtype of the parameters left unquantized (norms, unquantized embedding/head)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing quantized output folder (swapped in once the new one is complete)")
    p.add_argument("--json", action="store_true", help="print the written metadata (without the manifest)")
    # Quantize from full precision; the stored formats do not depend on the load dtype.
    p.set_defaults(func=cmd_quantize, dtype="float32", device="cpu")


def check_writable(out: Path) -> None:
    """Raise a FrugalError unless the folder ``out`` is written in (its parent, where the new folder is
    assembled and renamed into place, or the nearest existing ancestor) accepts new files."""
    import tempfile

    d = out.absolute().parent
    while not d.exists() and d != d.parent:  # the nearest existing folder is where mkdir starts
        d = d.parent
    if not d.is_dir():
        raise FrugalError(f"cannot write output {out}: {d} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".frugallm-write-test-")
    except OSError as e:
        raise FrugalError(f"cannot write output {out}: {d} is not writable ({e.strerror}); pick another -o") from None
    os.close(fd)
    os.unlink(probe)


def cmd_quantize(args: argparse.Namespace) -> int:
    if not args.quant:
        raise FrugalError("quantize needs --quant SPEC (e.g. int8, int4:group=32, gptq:bits=4:group=32)")
    parse_quant_spec(args.quant)  # fail fast on a typo
    store_dtype = resolve_dtype(args.store_dtype, torch.device("cpu"))
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.force:
            raise FrugalError(f"output {out} exists and is not an empty folder (use --force to overwrite)")
        if not is_quantized_folder(out):  # --force swaps the whole folder: never someone's other files
            raise FrugalError(f"output {out} exists and is not a quantized folder: --force only replaces the output "
                              "of a previous 'frugallm quantize'; pick a new or empty -o")
    check_writable(out)  # before the (slow) quantization, not after it
    model = args.source or args.model
    path = resolve_model_path(model)
    if is_quantized_folder(path):
        raise FrugalError(f"{path} is already quantized; quantize the source model instead")
    t0 = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, device=args.device, threads=args.threads, use_cache=not args.no_cache,
              quant=args.quant, calib=args.calib)
    quant_s = time.perf_counter() - t0
    meta = save_quantized(llm.model, out, spec=llm.quant_spec, config=llm.config, tokenizer=llm.tokenizer,
                          source=path, source_sha256=source_hash(path), store_dtype=store_dtype)
    summary = {k: v for k, v in meta.items() if k != "modules"}
    summary["output"] = str(out)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["quantize_seconds"] = round(quant_s, 2)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {out}: {summary['spec']}, {meta['weight_bytes'] / 2**20:.1f} MiB of weights "
            f"(theory {meta['theoretical_bytes'] / 2**20:.1f} MiB), {summary['seconds']:.1f} s",
            file=sys.stderr,
        )
    return 0
