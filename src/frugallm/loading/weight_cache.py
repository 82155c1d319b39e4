"""Converted-weights cache: dequantized, fused weights saved as safetensors, so reloads skip conversion.

Keyed by the source file's content hash, the target dtype and the engine version. The hash itself is
memoized per (path, size, mtime) so a warm load does not re-read the whole file.

An entry is trusted only after it checks out: ``meta.json`` carries each tensor's dtype, shape and CRC-32
(computed at write time), and ``meta.sha256`` the SHA-256 of ``meta.json``; :func:`load_entry` verifies all of them (the
CRCs on a thread pool: zlib releases the GIL, ~2 GB/s per core). A damaged or tampered entry (flipped bytes
inside a tensor, a wrong shape, a missing tensor, ``meta.json`` = ``{}``) is removed with one warning that
names ``--no-cache`` and the caller converts the weights again: rebuilt once per load, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from frugallm.paths import cache_dir
from frugallm.version import __version__

log = logging.getLogger(__name__)

# Bump when conversion output or the entry layout changes, so stale entries are not reused.
# 2: meta.json holds per-tensor CRC-32s, meta.sha256 its checksum.
_FORMAT = 2
_META_KEYS = ("config", "tokenizer", "source_info", "tensors")


def file_hash(path: Path) -> str:
    st = path.stat()
    memo_path = cache_dir() / "hashes.json"
    memo_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    if isinstance(memo.get(memo_key), str):
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


# -- integrity ---------------------------------------------------------------------------------------------
def tensor_crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (contiguous, native byte order)."""
    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _crcs(state: dict[str, torch.Tensor]) -> dict[str, int]:
    names = list(state)
    workers = max(1, min(len(names), torch.get_num_threads()))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda n: tensor_crc(state[n]), names), strict=True))


def _read_meta(d: Path) -> dict[str, Any]:
    """The entry's metadata, or ValueError saying what is wrong with it. Its SHA-256 sits beside it
    (``meta.sha256``), taken over the raw bytes: ~2 ms for the default model's 2 MB, no re-serialization."""
    try:
        raw = (d / "meta.json").read_bytes()
        recorded = (d / "meta.sha256").read_text().strip()
    except OSError as e:
        raise ValueError(f"entry unreadable ({e.strerror or type(e).__name__})") from None
    if hashlib.sha256(raw).hexdigest() != recorded:
        raise ValueError("meta.json does not match its checksum (edited or corrupt)")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"meta.json unreadable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS) or not isinstance(meta["tensors"], dict):
        raise ValueError("meta.json is incomplete")
    return meta


def _verify(state: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    """Raise ValueError naming the first tensor that is missing, extra, reshaped, retyped or corrupt."""
    if (missing := sorted(set(expected) - set(state))) or (extra := sorted(set(state) - set(expected))):
        raise ValueError(f"tensor {missing[0]!r} is missing" if missing else f"unexpected tensor {extra[0]!r}")
    for name, t in state.items():
        e = expected[name]
        if not isinstance(e, dict) or [str(t.dtype), list(t.shape)] != [e.get("dtype"), e.get("shape")]:
            raise ValueError(f"tensor {name!r} is {t.dtype} {list(t.shape)}, recorded as {e}")
    for name, crc in _crcs(state).items():
        if crc != expected[name].get("crc32"):
            raise ValueError(f"tensor {name!r} fails its checksum (corrupt bytes)")


def discard(d: Path, reason: str) -> None:
    """Warn once that entry ``d`` is unusable and remove it, so this load rebuilds it."""
    log.warning("weights cache entry %s is damaged (%s); converting the weights again and rewriting it "
                "(--no-cache, or use_cache=False, bypasses the cache)", d, reason)
    shutil.rmtree(d, ignore_errors=True)


# -- entries -----------------------------------------------------------------------------------------------
def load_entry(d: Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Return ``(state_dict, meta)``, or None if the entry is missing or fails its checks (then it is
    removed with a warning: the caller converts and saves it again). ``verify=False`` skips the CRCs
    (benchmarks measure their cost with it)."""
    from safetensors.torch import load_file

    weights = d / "model.safetensors"
    if not (d / "meta.json").is_file():
        if weights.exists():
            discard(d, "meta.json is missing (an interrupted write)")
        return None
    try:
        meta = _read_meta(d)
        try:
            state = load_file(weights)
        except Exception as e:  # noqa: BLE001 - any safetensors failure means the file is damaged
            raise ValueError(f"model.safetensors unreadable ({type(e).__name__}: {str(e)[:200]})") from None
        if verify:
            _verify(state, meta["tensors"])
    except ValueError as e:
        discard(d, str(e))
        return None
    return state, meta


def save_entry(d: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state_dict.items()}
    meta = {**meta, "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "crc32": crc}
                                for (k, v), crc in zip(state.items(), _crcs(state).values(), strict=True)}}
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / "meta.json").unlink(missing_ok=True)  # an entry without meta.json is incomplete
        tmp = d / "model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(d / "model.safetensors")
        raw = json.dumps(meta).encode()
        (d / "meta.sha256").write_text(hashlib.sha256(raw).hexdigest())
        tmp_meta = d / "meta.json.tmp"
        tmp_meta.write_bytes(raw)
        tmp_meta.replace(d / "meta.json")  # written last: marks the entry complete
    except OSError:
        pass


def find_meta(source_hash: str) -> dict[str, Any] | None:
    """Config, tokenizer and source info stored by any complete entry of this source (whatever its dtype):
    reading them is instant, while parsing a GGUF's metadata (its whole vocabulary) takes seconds. Entries
    whose metadata fails its checksum are skipped (the load then finds and rebuilds them)."""
    pattern = entry_dir(source_hash, torch.float32).name.replace("-float32-", "-*-", 1)
    try:
        for d in sorted((cache_dir() / "weights").glob(pattern)):
            if (d / "meta.json").is_file():
                try:
                    return _read_meta(d)
                except ValueError:
                    continue
    except OSError:
        pass
    return None
