"""A GGUF header parsed once per file version: metadata values and tensor records, cached as JSON.

``gguf.GGUFReader`` builds a numpy view for every element of every metadata array: 3-5 s for SmolLM2's 49k
tokens and 48k merges on these CPUs, on every load. Weights that run as stored need nothing else from the
file at load time, so that parse was nearly all of ``LLM("default")``'s load. :func:`open_index` parses with
``GGUFReader`` the first time (the validating path) and writes the values it read, and each tensor's type,
shape and offset, to ``<cache>/gguf-index/``; later opens of the same file (same resolved path, size and
modification time) read that JSON (~30 ms) and memory-map the tensors at the recorded offsets. The JSON holds
plain values only (no pickle); an entry that does not parse or does not match is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from frugallm.paths import cache_dir

_VERSION = 1


@dataclass(frozen=True)
class IndexedField:
    """One metadata value (``contents()`` as on ``gguf.ReaderField``)."""

    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True, eq=False)
class IndexedTensor:
    """A tensor record with ``gguf.ReaderTensor``'s attributes; ``data`` is a view of the file's memmap shaped
    as the reader shapes it (quantized: ``uint8 [rows, bytes per row]``)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF order: [K, N] for a matrix
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class IndexedReader:
    """What ``GGUFModelFile`` reads of a ``gguf.GGUFReader``: ``fields`` and ``tensors``."""

    def __init__(self, path: Path, fields: dict[str, Any], tensors: list[dict[str, Any]]) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        self.fields = {k: IndexedField(v) for k, v in fields.items()}
        mm = np.memmap(path, mode="r")
        plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        self.tensors = []
        for t in tensors:
            qtype = GGMLQuantizationType(t["type"])
            dims = tuple(reversed(t["shape"]))
            view = mm[t["offset"]: t["offset"] + t["n_bytes"]]
            if qtype in plain:
                data = view.view(plain[qtype]).reshape(dims)
            else:
                data = view.reshape(quant_shape_to_byte_shape(dims, qtype))
            assert GGML_QUANT_SIZES[qtype]  # a type this gguf version knows
            self.tensors.append(IndexedTensor(t["name"], qtype, np.array(t["shape"], dtype=np.uint64),
                                              int(np.prod(t["shape"])), t["n_bytes"], t["offset"], data))


def _entry(path: Path) -> Path:
    st = path.stat()
    key = f"{_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return cache_dir() / "gguf-index" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def cached(path: Path) -> IndexedReader | None:
    """The index of ``path`` if one was written for this version of the file."""
    entry = _entry(path)
    try:
        d = json.loads(entry.read_text())
        if d.get("version") != _VERSION or d.get("size") != path.stat().st_size:
            return None
        return IndexedReader(path, d["fields"], d["tensors"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(path: Path, reader: Any) -> None:
    """Write the index of a file ``reader`` (a ``gguf.GGUFReader``) parsed and the loader validated."""
    fields = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):  # the header's own counts, not metadata
            continue
        try:
            fields[name] = f.contents()
        except Exception:  # noqa: BLE001 - a value gguf cannot decode is read (and reported) on demand instead
            return
    tensors = [{"name": t.name, "type": int(t.tensor_type), "shape": [int(s) for s in t.shape],
                "offset": int(t.data_offset), "n_bytes": int(t.n_bytes)} for t in reader.tensors]
    entry = _entry(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _VERSION, "size": path.stat().st_size, "fields": fields,
                                   "tensors": tensors}))
        os.replace(tmp, entry)
    except (OSError, TypeError, ValueError):  # a read-only cache or an unserializable value: parse next time
        pass
