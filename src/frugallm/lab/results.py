"""Benchmark records: the JSONL file format, resume keys, and the environment stamped on every record.

One record per line, each line written whole and flushed (and fsynced), so an interrupted run leaves a
valid file: at worst a half-written last line, which :func:`read_records` skips. A record is either

* ``{"status": "ok", "key": ..., "point": {...}, "metrics": {...}, "unavailable": {...}, ...}`` or
* ``{"status": "error", "key": ..., "point": {...}, "error": "message", ...}``.

``key`` is a canonical JSON string of the point's parameters; a sweep skips points whose key is
already in the file (:func:`done_keys`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from frugallm.errors import FrugalError

SCHEMA_VERSION = 1


def point_key(params: dict[str, Any]) -> str:
    """Canonical identity of a benchmark point (sorted JSON of its parameters)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as one line; the line is written in one call, flushed and fsynced."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        line = json.dumps(record, default=_json_default, allow_nan=False) + "\n"
    except ValueError:  # a NaN/inf somewhere: strict JSON has no such values, write null instead
        line = json.dumps(_finite(record), default=_json_default, allow_nan=False) + "\n"
    with p.open("a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # a previous run died mid-line: start on a fresh line so this one parses
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All parseable records of a JSONL file, in order; broken lines (an interrupted write) are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FrugalError(f"results file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FrugalError(f"cannot read results file {p}: {e}") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def done_keys(path: str | Path, include_errors: bool = True) -> set[str]:
    """Keys already recorded in ``path`` (empty when the file does not exist)."""
    if not Path(path).exists():
        return set()
    return {r["key"] for r in read_records(path)
            if "key" in r and (include_errors or r.get("status") == "ok")}


def error_record(params: dict[str, Any], message: str) -> dict[str, Any]:
    """The record of a point that could not run: its parameters and one clear message."""
    return {"schema": SCHEMA_VERSION, "status": "error", "key": point_key(params), "point": params,
            "error": message, "timestamp": time.time(), "versions": package_versions(),
            "git_commit": git_commit()}


# ----------------------------------------------------------------------------------------- environment


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout frugallm runs from, or None (not a checkout, no git)."""
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def package_versions(names: Iterable[str] = ("frugallm", "torch", "transformers", "llama_cpp_python", "numpy")
                     ) -> dict[str, str | None]:
    """Installed distribution versions (None when not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(probe: Any | None) -> dict[str, Any]:
    """Host facts for a record; ``probe`` is a :class:`~frugallm.lab.hwprobe.ProbeResult` or None."""
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform(), "cpu_model": cpu_model(),
                            "logical_cores": os.cpu_count()}
    if probe is not None:
        info.update(cpu_model=probe.cpu_model, logical_cores=probe.logical_cores,
                    physical_cores=probe.physical_cores, cache_bytes=probe.cache_bytes,
                    num_threads=probe.num_threads, gpu_name=probe.gpu_name, device=probe.device,
                    probe_quick=probe.quick, probe_timestamp=probe.timestamp)
    return info


def config_label(point: dict[str, Any], shape: bool = True) -> str:
    """A short human name of a point, e.g. ``frugallm default float32 q=int4 b1 p128 g32``."""
    model = str(point.get("model", "default"))
    parts = [str(point.get("backend", "?")), model if model == "default" else Path(model).name]
    if point.get("backend") == "endpoint":
        parts[1] = str(point.get("endpoint"))
    else:
        parts.append(str(point.get("dtype", "auto")))
    if point.get("quant"):
        parts.append(f"q={point['quant']}")
    if point.get("kv"):
        parts.append(f"kv={point['kv']}")
    if shape:
        parts.append(f"b{point.get('batch')} p{point.get('prompt_len')} g{point.get('gen_len')}")
        if point.get("backend") == "endpoint":
            parts.append(f"c{point.get('concurrency')}")
    return " ".join(parts)
