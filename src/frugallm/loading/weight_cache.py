"""Converted-weights cache: dequantized, fused weights saved as safetensors, so reloads skip conversion.

Keyed by the source file's content hash, the target dtype and the engine version. The hash itself is
memoized per (path, size, mtime) so a warm load does not re-read the whole file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from frugallm.paths import cache_dir
from frugallm.version import __version__

# Bump when conversion output changes (names, layouts) so stale caches are not reused.
_FORMAT = 1


def file_hash(path: Path) -> str:
    st = path.stat()
    memo_path = cache_dir() / "hashes.json"
    memo_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()[:32]
    memo[memo_key] = digest
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    except OSError:
        pass  # a read-only cache dir only costs speed
    return digest


def entry_dir(source_hash: str, dtype: torch.dtype) -> Path:
    name = f"{source_hash}-{str(dtype).removeprefix('torch.')}-v{__version__}-f{_FORMAT}"
    return cache_dir() / "weights" / name


def load_entry(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Return ``(state_dict, meta)`` or None if the entry is missing or incomplete."""
    from safetensors.torch import load_file

    weights, meta = d / "model.safetensors", d / "meta.json"
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        return load_file(weights), json.loads(meta.read_text())
    except Exception:
        return None  # corrupt entry: rebuild it


def save_entry(d: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
        tmp.replace(d / "model.safetensors")
        (d / "meta.json").write_text(json.dumps(meta))  # written last: marks the entry complete
    except OSError:
        pass


def find_meta(source_hash: str) -> dict[str, Any] | None:
    """Config, tokenizer and source info stored by any complete entry of this source (whatever its dtype):
    reading them is instant, while parsing a GGUF's metadata (its whole vocabulary) takes seconds."""
    pattern = entry_dir(source_hash, torch.float32).name.replace("-float32-", "-*-", 1)
    try:
        for d in sorted((cache_dir() / "weights").glob(pattern)):
            if (d / "meta.json").is_file():
                meta = json.loads((d / "meta.json").read_text())
                if {"config", "tokenizer", "source_info"} <= set(meta):
                    return meta
    except (OSError, ValueError):
        pass
    return None
