"""Quantized model folders, the loading half (``frugallm quantize`` writes them, see
:mod:`frugallm.quant.storage`).

Loading builds the float model on the meta device, installs each quantized module directly around its
stored tensors (no ``__init__``, so nothing is re-quantized and no full-precision weight of a quantized
matrix is ever created) and assigns the remaining parameters. Every mismatch between metadata, tensors
and model config raises a :class:`FrugalError` naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.errors import FrugalError
from frugallm.loading.base import LoadedModel, ModelDescription, materialize
from frugallm.model.llama import Transformer
from frugallm.quant import GroupQuantLinear, Int8Linear, LLMInt8Linear, Mix4Linear, QuantEmbedding
from frugallm.quant.spec import parse_quant_spec
from frugallm.quant.storage import (
    CONFIG_FILE,
    DERIVED_BUFFERS,
    FORMAT_VERSION,
    META_FILE,
    QUANT_MODULES,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    is_quantized_folder,
)
from frugallm.tokenizer.tokenizer import Tokenizer

__all__ = ["describe", "is_quantized_folder", "load", "load_quantized", "read_metadata"]

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool,
)}



def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FrugalError(f"quantized folder {path.parent}: missing {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrugalError(f"quantized folder {path.parent}: {path.name} is corrupt ({e})") from None
    except RecursionError:
        raise FrugalError(f"quantized folder {path.parent}: {path.name} is corrupt (JSON nested too deeply)") from None


def _parse_json(path: Path, what: str, parse: Any) -> Any:
    """``parse(json of path)``; any failure becomes a FrugalError naming the file."""
    try:
        return parse(_read_json(path, what))
    except FrugalError:
        raise
    except Exception as e:
        raise FrugalError(f"quantized folder {path.parent}: {path.name} is not a frugallm {what} ({e})") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    meta = _read_json(p / META_FILE, "quantization metadata")
    if not isinstance(meta, dict) or meta.get("format") != "frugallm-quant":
        raise FrugalError(f"{p / META_FILE} is not frugallm quantization metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FrugalError(
            f"{p / META_FILE}: format version {meta.get('format_version')} is not supported (expected "
            f"{FORMAT_VERSION}); re-run `frugallm quantize`"
        )
    for key in ("spec", "modules"):
        if key not in meta:
            raise FrugalError(f"{p / META_FILE}: missing field {key!r}")
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = path / WEIGHTS_FILE
    if not f.is_file():
        raise FrugalError(f"quantized folder {path}: missing {WEIGHTS_FILE}")
    try:
        return load_file(str(f), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        raise FrugalError(f"quantized folder {path}: {WEIGHTS_FILE} is corrupt or truncated ({e})") from None


def _get(model: nn.Module, path: str) -> nn.Module | None:
    m: nn.Module | None = model
    for part in path.split("."):
        m = getattr(m, part, None) if m is not None else None
        if not isinstance(m, nn.Module):
            return None
    return m


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    if parent is None:
        raise FrugalError(f"metadata names module {path!r}, which this model does not have")
    setattr(parent, name, module)


def _expected_shape(target: nn.Module) -> tuple[int, int]:
    if isinstance(target, nn.Linear):
        return target.out_features, target.in_features
    if isinstance(target, nn.Embedding):
        return target.num_embeddings, target.embedding_dim
    raise FrugalError(f"cannot place a quantized module where the model has {type(target).__name__}")


def _check_sizes(where: str, m: nn.Module) -> None:
    """The stored code tensors must hold exactly the codes the module's shape needs."""
    if isinstance(m, QuantEmbedding):
        return
    n, k = m.out_features, m.in_features
    codes = m.qweight.numel() * m.qweight.element_size()
    if isinstance(m, Int8Linear | LLMInt8Linear):
        want, wanted_scales = n * k, n
        got_scales = m.scales.numel()
    elif isinstance(m, GroupQuantLinear):
        if m.group_size <= 0 or k % m.group_size:
            raise FrugalError(f"{where}: group size {m.group_size} does not divide in_features {k}")
        want = math.ceil(n * k * m.bits / 8)
        wanted_scales = n * (k // m.group_size) * (1 if m.symmetric and m.layout == "packed" else 2)
        got_scales = m.qscale.numel()
    elif isinstance(m, Mix4Linear):
        if m.group_size <= 0 or k % m.group_size:
            raise FrugalError(f"{where}: group size {m.group_size} does not divide in_features {k}")
        want, wanted_scales, got_scales = n * k // 2, n * (k // m.group_size) * 2, m.qscale.numel()
    else:  # pragma: no cover - QUANT_MODULES is closed
        return
    if codes != want:
        raise FrugalError(f"{where}: stored codes are {codes} bytes, a {n}x{k} matrix needs {want}")
    if got_scales != wanted_scales:
        raise FrugalError(f"{where}: {got_scales} scale values stored, {wanted_scales} expected")
    bias = getattr(m, "bias", None)
    if bias is not None and bias.shape != (n,):
        raise FrugalError(f"{where}: bias has shape {tuple(bias.shape)}, expected ({n},)")


def _build_module(entry: dict[str, Any], tensors: dict[str, torch.Tensor], meta_model: nn.Module) -> nn.Module:
    path, cls_name = entry["path"], entry.get("class")
    if cls_name not in QUANT_MODULES:
        raise FrugalError(f"module {path!r}: unknown quantized module type {cls_name!r}")
    target = _get(meta_model, path)
    parent_path, _, leaf = path.rpartition(".")
    if target is None and leaf == "table" and isinstance(_get(meta_model, parent_path), nn.Embedding):
        target = _get(meta_model, parent_path)  # the table of a QuantEmbedding has the embedding's shape
    if target is None:
        raise FrugalError(f"metadata names module {path!r}, which this model does not have")
    n, k = _expected_shape(target)
    cls = QUANT_MODULES[cls_name]
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for key, value in entry.get("attrs", {}).items():
        if isinstance(value, dict) and "dtype" in value:
            if value["dtype"] not in _DTYPES:
                raise FrugalError(f"module {path!r}: unknown dtype {value['dtype']!r}")
            value = _DTYPES[value["dtype"]]
        setattr(m, key, value)
    where = f"module {path!r} ({cls_name})"
    size = (m.num_embeddings, m.embedding_dim) if cls is QuantEmbedding else (m.out_features, m.in_features)
    if tuple(size) != (n, k):
        raise FrugalError(f"{where}: stored shape {tuple(size)} does not match the model's ({n}, {k})")
    if cls is QuantEmbedding:
        return m
    for bname, info in entry.get("buffers", {}).items():
        if info is None:
            m.register_buffer(bname, None)
        elif info.get("derived"):
            make = DERIVED_BUFFERS.get((cls_name, bname))
            if make is None:
                raise FrugalError(f"{where}: unknown derived buffer {bname!r}")
            m.register_buffer(bname, make(), persistent=False)
        else:
            key = f"{path}.{bname}"
            t = tensors.pop(key, None)
            if t is None:
                raise FrugalError(f"{WEIGHTS_FILE} lacks tensor {key!r} named in the metadata")
            if list(t.shape) != list(info.get("shape", [])) or str(t.dtype).removeprefix("torch.") != info.get("dtype"):
                raise FrugalError(
                    f"tensor {key!r} is {tuple(t.shape)} {t.dtype}; the metadata says "
                    f"{tuple(info.get('shape', []))} {info.get('dtype')}"
                )
            m.register_buffer(bname, t)
    for required in ("qweight",):
        if getattr(m, required, None) is None:
            raise FrugalError(f"{where}: no {required} tensor")
    if isinstance(m, GroupQuantLinear) and m.layout != "packed":
        from frugallm.quant import kernels

        if m.layout not in kernels.INT4_LAYOUTS:
            raise FrugalError(f"{where}: unknown int4 kernel layout {m.layout!r} (saved with another torch?)")
    _check_sizes(where, m)
    if hasattr(m, "_init_runtime"):
        m._init_runtime()  # derived state that __init__ would have made
    return m


def _config_from_json(d: dict[str, Any]) -> ModelConfig:
    """The Hugging Face form written today, or the ``ModelConfig.to_dict`` dump of earlier folders."""
    return ModelConfig.from_dict(d) if "arch" in d else ModelConfig.from_hf(d)


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes per stored dtype, from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    f = path / WEIGHTS_FILE
    if not f.is_file():
        raise FrugalError(f"quantized folder {path}: missing {WEIGHTS_FILE}")
    sizes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    out: dict[str, int] = {}
    try:
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                sl = sf.get_slice(k)
                dt = sl.get_dtype()
                out[dt] = out.get(dt, 0) + math.prod(sl.get_shape()) * sizes.get(dt, 4)
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        raise FrugalError(f"quantized folder {path}: {WEIGHTS_FILE} is corrupt or truncated ({e})") from None
    return out


def describe(path: Path) -> ModelDescription:
    """Describe a quantized folder from its metadata, config, tokenizer and safetensors header."""
    meta = read_metadata(path)
    spec = parse_quant_spec(str(meta["spec"]))  # unknown methods / options fail here, by name
    cfg = _parse_json(path / CONFIG_FILE, "model config", _config_from_json)
    tok_dict = _parse_json(path / TOKENIZER_FILE, "tokenizer", dict)
    type_bytes = _tensor_bytes(path)
    info = {
        "quant_spec": str(spec),
        "quant_source": meta.get("source"),
        "quant_source_sha256": meta.get("source_sha256"),
        "file_bytes": (path / WEIGHTS_FILE).stat().st_size,
        "weight_bytes": meta.get("weight_bytes"),
        "tensor_type_bytes": type_bytes,
    }

    def make_tokenizer() -> Tokenizer:
        try:
            return Tokenizer.from_dict(tok_dict)
        except Exception as e:
            raise FrugalError(f"quantized folder {path}: {TOKENIZER_FILE} is not a frugallm tokenizer ({e})") from None

    return ModelDescription(
        format="quantized",
        path=path,
        config=cfg,
        tensor_bytes=type_bytes,
        chat_template=tok_dict.get("chat_template") is not None,
        source_info=info,
        make_tokenizer=make_tokenizer,
        handle=meta,
    )


def load(desc: ModelDescription, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Install the stored quantized modules and assign the rest.

    ``dtype`` applies to the unquantized floating-point parameters (norms, unquantized embedding/head) and
    to the embedding output; quantized modules keep their stored formats.
    """
    p, cfg = desc.path, desc.config
    meta = desc.handle if isinstance(desc.handle, dict) else read_metadata(p)
    entries = meta["modules"]
    if not isinstance(entries, list):
        raise FrugalError(f"{p / META_FILE}: 'modules' must be a list")
    tensors = _load_tensors(p)

    def install(model: Transformer) -> list[str]:
        built: dict[str, nn.Module] = {}
        for entry in entries:
            if not isinstance(entry, dict) or "path" not in entry:
                raise FrugalError(f"{p / META_FILE}: malformed module entry {entry!r}")
            if "alias_of" in entry:
                continue
            built[entry["path"]] = _build_module(entry, tensors, model)
        # Install parents first (a QuantEmbedding), then tables inside them, then shared aliases.
        for path in sorted(built, key=lambda s: s.count(".")):
            m = built[path]
            if isinstance(m, QuantEmbedding):
                m.dtype = dtype
            _set(model, path, m)
        for entry in entries:
            if "alias_of" in entry:
                src = built.get(entry["alias_of"])
                if src is None:
                    raise FrugalError(f"module {entry['path']!r} aliases unknown module {entry['alias_of']!r}")
                _set(model, entry["path"], src)
        for path, m in built.items():
            if isinstance(m, QuantEmbedding) and not isinstance(getattr(m, "table", None), nn.Module):
                raise FrugalError(f"quantized embedding {path!r} has no stored table")
        # The quantized modules took their tensors; the rest are plain parameters (rope factors stay fp32).
        for k, v in tensors.items():
            if v.is_floating_point() and k != "rope_factors":
                tensors[k] = v.to(dtype)
        return list(built)

    model = materialize(cfg, tensors, device, where=f"quantized folder {p}", install=install)
    return LoadedModel(model, cfg, desc.tokenizer(), p, "quantized", False, 0.0, dict(desc.source_info))


def load_quantized(path: str | Path, dtype: torch.dtype, device: torch.device | str) -> LoadedModel:
    """Load a folder written by :func:`frugallm.quant.storage.save_quantized`."""
    return load(describe(Path(path)), dtype, torch.device(device))
