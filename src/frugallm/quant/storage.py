"""Quantized model folders: save a quantized ``Transformer`` as safetensors + metadata, load it back packed.

Folder layout (written by :func:`save_quantized`, ``frugallm quantize MODEL --quant SPEC -o DIR``):

* ``model.safetensors``: every stored tensor exactly as the runtime modules hold it (bit-packed codes or
  the int4 kernel layout, 16-bit scales, int8 rows, biases) plus the unquantized parameters (norms, and
  the embedding / head unless quantized). Shared storage (a tied head) is written once.
* ``frugallm_quant.json``: format version, the quantization spec (method, bits, group size, flags), the
  source model's path and content hash, torch version, byte counts (stored and theoretical) and a
  manifest of the quantized modules: class, constructor attributes, buffer names, shapes and dtypes.
* ``config.json``: :meth:`ModelConfig.to_dict`; ``tokenizer.json``: :meth:`Tokenizer.to_dict`.

Loading (:func:`load_quantized`) builds the float model on the meta device, installs each quantized
module directly around its stored tensors (no ``__init__``, so nothing is re-quantized and no
full-precision weight of a quantized matrix is ever created) and assigns the remaining parameters.
Every mismatch between metadata, tensors and model config raises a :class:`FrugalError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frugallm.errors import FrugalError
from frugallm.quant.embedding import QuantEmbedding
from frugallm.quant.group_linear import GroupQuantLinear
from frugallm.quant.int8 import Int8Linear
from frugallm.quant.llm_int8 import LLMInt8Linear
from frugallm.quant.mix4 import GRIDS, Mix4Linear

FORMAT_VERSION = 1
META_FILE = "frugallm_quant.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

QUANT_MODULES: dict[str, type[nn.Module]] = {
    c.__name__: c for c in (Int8Linear, LLMInt8Linear, GroupQuantLinear, Mix4Linear, QuantEmbedding)
}
# Non-persistent buffers are derived constants: rebuilt at load time rather than stored.
_DERIVED_BUFFERS = {("Mix4Linear", "grids"): lambda: GRIDS}  # shared, as Mix4Linear on CPU
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool,
)}


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
                if (cls, bname) not in _DERIVED_BUFFERS:
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
    embedding / head) on the way out; None keeps them as they are."""
    from safetensors.torch import save_file

    from frugallm import __version__

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FrugalError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    tensors, manifest = collect_tensors(model)
    if store_dtype is not None:
        quant_keys = {f"{e['path']}.{b}" for e in manifest if "class" in e for b in e["buffers"]}
        tensors = {
            k: t.to(store_dtype) if k not in quant_keys and k != "rope_factors" and t.is_floating_point() else t
            for k, t in tensors.items()
        }
    if not any("class" in e for e in manifest):
        raise FrugalError("the model has no quantized modules; quantize it first")
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
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "frugallm-quant", "spec": str(spec)})
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict()))
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


# ------------------------------------------------------------------------------------------------ load


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FrugalError(f"quantized folder {path.parent}: missing {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrugalError(f"quantized folder {path.parent}: {path.name} is corrupt ({e})") from None


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
            make = _DERIVED_BUFFERS.get((cls_name, bname))
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


def load_quantized(path: str | Path, dtype: torch.dtype, device: torch.device | str) -> Any:
    """Load a folder written by :func:`save_quantized` -> :class:`frugallm.loading.LoadedModel`.

    ``dtype`` applies to the unquantized floating-point parameters (norms, unquantized embedding/head) and
    to the embedding output; quantized modules keep their stored formats.
    """
    from frugallm.config import ModelConfig
    from frugallm.loading import LoadedModel
    from frugallm.model.llama import Transformer
    from frugallm.quant.spec import parse_quant_spec
    from frugallm.tokenizer.tokenizer import Tokenizer

    t0 = time.perf_counter()
    p = Path(path)
    device = torch.device(device)
    meta = read_metadata(p)
    spec = parse_quant_spec(str(meta["spec"]))  # unknown methods / options fail here, by name
    cfg = _parse_json(p / CONFIG_FILE, "model config", ModelConfig.from_dict)
    tok = _parse_json(p / TOKENIZER_FILE, "tokenizer", Tokenizer.from_dict)
    tensors = _load_tensors(p)

    with torch.device("meta"):
        model = Transformer(cfg)
    built: dict[str, nn.Module] = {}
    entries = meta["modules"]
    if not isinstance(entries, list):
        raise FrugalError(f"{p / META_FILE}: 'modules' must be a list")
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

    rope = tensors.pop("rope_factors", None)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise FrugalError(f"quantized folder {p}: weights do not match the model config: {e}") from None
    quant_buffers = {f"{path}.{b}" for path, m in built.items() for b in m._buffers}
    missing = [k for k in missing if k not in quant_buffers and not k.startswith(tuple(f"{q}." for q in built))]
    plain_head = isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    if cfg.tie_word_embeddings and plain_head:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise FrugalError(
            f"quantized folder {p}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t is not None and t.is_meta]
    if leftover:
        raise FrugalError(f"quantized folder {p}: no stored values for {leftover[:5]}")
    if rope is not None:
        model.rope_factors = rope.float()
    model = model.to(device)
    model.eval().requires_grad_(False)
    info = {
        "quant_spec": str(spec),
        "quant_source": meta.get("source"),
        "quant_source_sha256": meta.get("source_sha256"),
        "file_bytes": (p / WEIGHTS_FILE).stat().st_size,
        "weight_bytes": meta.get("weight_bytes"),
    }
    return LoadedModel(model, cfg, tok, p, "quantized", False, time.perf_counter() - t0, info)
