"""Quantized model folders, the saving half: write a quantized ``Transformer`` as safetensors + metadata.

Folder layout (written by :func:`save_quantized`, ``frugallm quantize MODEL --quant SPEC -o DIR``):

* ``model.safetensors``: every stored tensor exactly as the runtime modules hold it (bit-packed codes or
  the int4 kernel layout, 16-bit scales, int8 rows, biases) plus the unquantized parameters (norms, and
  the embedding / head unless quantized). Shared storage (a tied head) is written once.
* ``frugallm_quant.json``: format version, the quantization spec (method, bits, group size, flags), the
  source model's path and content hash, torch version, byte counts (stored and theoretical) and a
  manifest of the quantized modules: class, constructor attributes, buffer names, shapes and dtypes.
* ``config.json``: the Hugging Face form of the model config (:meth:`ModelConfig.to_hf`), so other tools
  read the architecture; frugallm reads it back with :meth:`ModelConfig.from_hf` (equal by construction,
  checked on save). Folders from before this change hold :meth:`ModelConfig.to_dict` there; the loader
  accepts both. ``tokenizer.json``: :meth:`Tokenizer.to_dict`.

The loading half lives in :mod:`frugallm.loading.quantized` (loading depends on this module, never the
reverse). This module also defines what both halves share: file names, the module classes that may
appear, and the buffers rebuilt rather than stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frugallm.errors import FrugalError
from frugallm.quant import GroupQuantLinear, Int8Linear, LLMInt8Linear, Mix4Linear, QuantEmbedding
from frugallm.quant.mix4 import GRIDS

# Version 1 folders before the Hugging Face config.json still load: the same version, a config either way.
FORMAT_VERSION = 1
META_FILE = "frugallm_quant.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

QUANT_MODULES: dict[str, type[nn.Module]] = {
    c.__name__: c for c in (Int8Linear, LLMInt8Linear, GroupQuantLinear, Mix4Linear, QuantEmbedding)
}
# Non-persistent buffers are derived constants: rebuilt at load time rather than stored.
DERIVED_BUFFERS = {("Mix4Linear", "grids"): lambda: GRIDS}  # shared, as Mix4Linear on CPU


def is_quantized_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file()


def source_hash(path: str | Path) -> str:
    """sha256 of a model file, or of a folder's files (names and contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ byte counts


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def theoretical_module_bytes(m: nn.Module) -> int:
    """Packed size of one quantized module from its shape and format alone (not from its tensors):
    ``N*K*bits/8`` codes + 16-bit group params (+ 2-bit mix4 selectors) or fp32 row scales, + perm, bias."""
    if isinstance(m, QuantEmbedding):
        return theoretical_module_bytes(m.table)
    n, k = m.out_features, m.in_features
    bias = _nbytes(getattr(m, "bias", None))
    if isinstance(m, Int8Linear | LLMInt8Linear):
        return n * k + 4 * n + bias
    if isinstance(m, GroupQuantLinear):
        groups = n * (k // m.group_size)
        perm = 0 if m.perm is None else _nbytes(m.perm)
        return math.ceil(n * k * m.bits / 8) + groups * 2 * (1 if m.symmetric else 2) + perm + bias
    if isinstance(m, Mix4Linear):
        groups = n * (k // m.group_size)
        return n * k // 2 + math.ceil(groups * 2 / 8) + groups * 4 + bias
    raise FrugalError(f"no byte formula for {type(m).__name__}")


def _quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    """First path of every quantized module (shared modules once), parents before children."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m).__name__ in QUANT_MODULES and id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out


def theoretical_weight_bytes(model: nn.Module, store_dtype: torch.dtype | None = None) -> int:
    """Theoretical packed size of the whole model: quantized modules by formula, other parameters as stored
    (in ``store_dtype`` when given)."""
    quant = _quant_modules(model)
    total = sum(theoretical_module_bytes(m) for m in quant.values() if not isinstance(m, QuantEmbedding))
    inside = {id(t) for m in quant.values() for t in (*m.parameters(), *m.buffers())}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in inside and id(p) not in seen:
            seen.add(id(p))
            size = p.element_size() if store_dtype is None else torch.empty(0, dtype=store_dtype).element_size()
            total += p.numel() * size
    return total


# ------------------------------------------------------------------------------------------------ save


def _attrs(m: nn.Module) -> dict[str, Any]:
    """The module's plain constructor-set attributes (ints, floats, strings, bools, dtypes)."""
    out: dict[str, Any] = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, torch.dtype):
            out[k] = {"dtype": str(v).removeprefix("torch.")}
        elif v is None or isinstance(v, bool | int | float | str):
            out[k] = v
    return out


def collect_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """``(tensors to store, manifest of quantized modules)`` for a quantized model."""
    quant = _quant_modules(model)
    first_path = {id(m): p for p, m in quant.items()}
    tensors: dict[str, torch.Tensor] = {}
    manifest: list[dict[str, Any]] = []
    for path, m in model.named_modules(remove_duplicate=False):
        cls = type(m).__name__
        if cls not in QUANT_MODULES:
            continue
        if first_path[id(m)] != path:
            manifest.append({"path": path, "alias_of": first_path[id(m)]})
            continue
        buffers: dict[str, Any] = {}
        for bname, buf in m._buffers.items():
            if bname in m._non_persistent_buffers_set:
                if (cls, bname) not in DERIVED_BUFFERS:
                    raise FrugalError(f"cannot save {path}: non-persistent buffer {bname!r} of {cls} is unknown")
                buffers[bname] = {"derived": True}
            elif buf is None:
                buffers[bname] = None
            else:
                key = f"{path}.{bname}"
                tensors[key] = buf.detach().contiguous().cpu()
                buffers[bname] = {"shape": list(buf.shape), "dtype": str(buf.dtype).removeprefix("torch.")}
        entry = {"path": path, "class": cls, "attrs": _attrs(m), "buffers": buffers}
        if isinstance(m, QuantEmbedding):
            entry["table"] = f"{path}.table"
        manifest.append(entry)
    # Everything outside the quantized modules, shared tensors once (a tied head keeps the embedding's).
    inside = {id(t) for m in quant.values() for t in (*m.parameters(), *m.buffers()) if t is not None}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in inside or id(t) in seen:
            continue
        seen.add(id(t))
        tensors[name] = t.detach().contiguous().cpu()
    rope = getattr(model, "rope_factors", None)
    if rope is not None:
        tensors["rope_factors"] = rope.detach().float().contiguous().cpu()
    return tensors, manifest


def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    *,
    spec: Any,
    config: Any,
    tokenizer: Any,
    source: str | Path | None = None,
    source_sha256: str | None = None,
    store_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Write ``model`` (already quantized with ``spec``) to ``out_dir``; returns the metadata written.

    ``store_dtype`` (e.g. fp16) casts the unquantized floating-point parameters (norms, an unquantized
    embedding / head) on the way out; None keeps them as they are. The folder is written whole beside the
    target and renamed into place (:func:`_publish`): an interrupted write leaves ``out_dir`` as it was."""
    from safetensors.torch import save_file

    from frugallm.version import __version__

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FrugalError(f"output {out} exists and is not a folder")
    tensors, manifest = collect_tensors(model)
    if store_dtype is not None:
        quant_keys = {f"{e['path']}.{b}" for e in manifest if "class" in e for b in e["buffers"]}
        tensors = {
            k: t.to(store_dtype) if k not in quant_keys and k != "rope_factors" and t.is_floating_point() else t
            for k, t in tensors.items()
        }
    if not any("class" in e for e in manifest):
        raise FrugalError("the model has no quantized modules; quantize it first")
    hf_config = config.to_hf()
    if type(config).from_hf(hf_config) != config:
        raise FrugalError(f"this model's config has no Hugging Face config.json form that reads back equal: {config}")
    stored = sum(_nbytes(t) for k, t in tensors.items() if k != "rope_factors")
    meta = {
        "format": "frugallm-quant",
        "format_version": FORMAT_VERSION,
        "frugallm_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spec": str(spec),
        "method": spec.method,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "include_embeddings": spec.include_embeddings,
        "include_lm_head": spec.include_lm_head,
        "source": None if source is None else str(source),
        "source_sha256": source_sha256,
        "weight_bytes": stored,
        "theoretical_bytes": theoretical_weight_bytes(model, store_dtype),
        "modules": manifest,
    }
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "partial")
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "frugallm-quant", "spec": str(spec)})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict()))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _publish(tmp, out)
    except BaseException:  # Ctrl-C included: the partial folder goes, the previous output stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _sibling(out: Path, kind: str) -> Path:
    """A new, empty folder beside ``out`` (hidden, unique: concurrent or crashed runs never collide)."""
    d = out.absolute().parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    d.mkdir()
    return d


def _publish(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out`` (same parent folder, so renames are atomic). A previous ``out``
    is moved aside first and removed only once the new one is in place (moved back if that fails)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = _sibling(out, "old")
    os.rename(out, old / "previous")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "previous", out)
        raise
    shutil.rmtree(old, ignore_errors=True)
