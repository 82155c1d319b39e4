"""Benchmark records: the JSONL file format, resume keys, and the environment stamped on every record.

One record per line, each line written whole and flushed (and fsynced), so an interrupted run leaves a
valid file: at worst a half-written last line, which :func:`read_records` skips. A record is either

* ``{"status": "ok", "key": ..., "point": {...}, "metrics": {...}, "unavailable": {...}, ...}`` or
* ``{"status": "error", "key": ..., "point": {...}, "error": "message", ...}``.

``key`` is a canonical JSON string of the point's parameters; a sweep skips points whose key is
already in the file (:func:`done_keys`). ``metrics`` holds every key of :data:`METRIC_KEYS`, each null
one with its reason in ``unavailable`` (:class:`Metrics` enforces both), so readers never guess why a
number is missing. :func:`summary_rows` / :func:`print_table` turn records into the headline table.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from frugallm import cpu
from frugallm.errors import FrugalError

SCHEMA_VERSION = 1
LATENCY_KEYS = ("ttft_s", "tpot_s", "e2e_s")
# --spec points: what speculation did, and the same point decoded without it in the same run (lab/point_metrics.py).
SPEC_KEYS = ("spec_acceptance_rate", "spec_mean_accepted_length", "spec_acceptance_by_position", "spec_draft_share",
             "spec_memory_bytes", "nospec_output_tokens_per_s", "nospec_tpot_s", "spec_speedup",
             "spec_decode_speedup")
METRIC_KEYS = (
    *LATENCY_KEYS, "output_tokens", "requests", "failed_requests", "output_tokens_per_s", "requests_per_s",
    "load_s", "peak_rss_bytes", "peak_rss_delta_bytes", "rss_sampled_peak_bytes", "cuda_max_allocated_bytes",
    "cuda_max_reserved_bytes", "weight_bytes", "kv_cache_bytes", "kv_cache_bytes_per_token",
    "fp16_baseline_bytes", "compression_rate", "decode_mbu", "decode_mfu", "prefill_mbu", "prefill_mfu",
    "decode_achieved_gbs", "prefill_achieved_flops", "predicted_ttft_s", "predicted_tpot_s",
    "ttft_over_predicted", "tpot_over_predicted", "predicted_ttft_peak_s", "predicted_tpot_peak_s",
    "ttft_over_predicted_peak", "tpot_over_predicted_peak", "decode_gemv_efficiency",
    "energy_method", "energy_j", "energy_per_token_j",
    "energy_per_request_j", "avg_power_w", "perplexity", "nll", "kl_divergence", "top1_agreement",
    *SPEC_KEYS,
)
# Point fields added after records were written: left out of the key while unset, so old records still resume.
_LATE_FIELDS = ("spec",)


class Metrics:
    """A record's ``metrics`` and ``unavailable``: every metric gets a value or the reason it has none."""
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}

    def put(self, key: str, value: Any, reason: str = "") -> None:
        assert key in METRIC_KEYS, key
        self.values[key] = value
        if value is None:
            self.unavailable[key] = reason or "not measured"

    def none(self, keys: Iterable[str], reason: str) -> None:
        for k in keys:
            if k not in self.values:
                self.put(k, None, reason)

    def finish(self) -> tuple[dict[str, Any], dict[str, str]]:
        self.none(METRIC_KEYS, "not measured")
        return {k: self.values[k] for k in METRIC_KEYS}, self.unavailable


def point_key(params: dict[str, Any]) -> str:
    """Canonical identity of a benchmark point (sorted JSON of its parameters)."""
    params = {k: v for k, v in params.items() if not (k in _LATE_FIELDS and v is None)}
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


def ok_record(params: dict[str, Any]) -> dict[str, Any]:
    """The common head of a measured point's record (the runner adds metrics and context)."""
    return {"schema": SCHEMA_VERSION, "status": "ok", "key": point_key(params), "label": config_label(params),
            "point": params, "timestamp": time.time(), "versions": package_versions(), "git_commit": git_commit()}


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
    """The CPU's marketing name (see :func:`frugallm.cpu.model_name`)."""
    return cpu.model_name() or "unknown"


def machine_info(probe: Any | None) -> dict[str, Any]:
    """Host facts for a record; ``probe`` is a :class:`~frugallm.lab.hwprobe.ProbeResult` or None."""
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform(), "cpu_model": cpu_model(),
                            "logical_cores": os.cpu_count()}
    if probe is not None:
        info.update(cpu_model=probe.cpu_model, logical_cores=probe.logical_cores,
                    physical_cores=probe.physical_cores, cache_bytes=probe.cache_bytes,
                    num_threads=probe.num_threads, gpu_name=probe.gpu_name, device=probe.device,
                    probe_quick=probe.quick, probe_timestamp=probe.timestamp,
                    probe_loadavg_1m=probe.loadavg_1m, probe_age_s=probe.age_s, probe_busy=probe.busy)
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
    if point.get("spec"):
        parts.append(f"spec={point['spec']}")
    if shape:
        parts.append(f"b{point.get('batch')} p{point.get('prompt_len')} g{point.get('gen_len')}")
        if point.get("backend") == "endpoint":
            parts.append(f"c{point.get('concurrency')}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------- presentation


def _fmt(v: Any, scale: float = 1.0, spec: str = ".3g") -> str:
    return "-" if v is None else format(v * scale, spec)


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row of headline numbers per record (shared by the terminal table and the Markdown report)."""
    rows = []
    for r in records:
        label = r.get("label") or config_label(r.get("point", {}))
        if r.get("status") != "ok":
            rows.append({"config": label, "status": f"error: {r.get('error')}"})
            continue
        m = r["metrics"]
        energy = m.get("energy_per_token_j")
        tpot_roof, mbu = m.get("tpot_over_predicted"), m.get("decode_mbu")
        rows.append({
            "config": label, "status": "ok",
            "TTFT p50 ms": _fmt((m.get("ttft_s") or {}).get("p50"), 1e3),
            "TPOT p50 ms": _fmt((m.get("tpot_s") or {}).get("p50"), 1e3),
            "tok/s": _fmt(m.get("output_tokens_per_s"), 1, ".4g"),
            # "!": past a ceiling (see the record's flags), never a result to read as is
            "TPOT / roofline": _fmt(tpot_roof) + (" !" if tpot_roof is not None and tpot_roof < 1 else ""),
            "MBU": "-" if mbu is None else _fmt(mbu, 1, ".2%") + (" !" if mbu > 1 else ""),
            "weights MB": _fmt(m.get("weight_bytes"), 1e-6, ".4g"),
            "KV MB": _fmt(m.get("kv_cache_bytes"), 1e-6, ".3g"),
            "compr.": _fmt(m.get("compression_rate")),
            "ppl": _fmt(m.get("perplexity"), 1, ".4g"),
            "KL": _fmt(m.get("kl_divergence")),
            "J/tok": "-" if energy is None else f"{energy:.3g} ({m.get('energy_method')})",
        })
        if m.get("spec_acceptance_rate") is not None:  # --spec: acceptance and the gain over no speculation
            rows[-1].update({"accept": _fmt(m["spec_acceptance_rate"], 1, ".0%"),
                             "tok/round": _fmt(m.get("spec_mean_accepted_length")),
                             "spec x": _fmt(m.get("spec_speedup"), 1, ".3g"),
                             "spec +MB": _fmt(m.get("spec_memory_bytes"), 1e-6, ".3g")})  # SpecMemo: what it adds
    return rows


def print_table(records: list[dict[str, Any]], file: Any = None) -> None:
    """The :func:`summary_rows` of ``records`` as a rich table on ``file`` (stdout)."""
    from rich.console import Console
    from rich.table import Table

    rows = summary_rows(records)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    table = Table(title="frugallm bench")
    for c in cols:
        table.add_column(c, justify="left" if c in ("config", "status") else "right", overflow="fold")
    for row in rows:
        table.add_row(*(row.get(c, "") for c in cols))
    console = Console(file=file or sys.stdout, width=200)
    console.print(table)
    for line in record_warnings(records, ("flags",)):
        console.print(f"! {line}", markup=False)


def record_warnings(records: list[dict[str, Any]], keys: tuple[str, ...] = ("flags", "notes")) -> list[str]:
    """The records' ``flags`` (figures past a ceiling, a doubtful probe) and ``notes``, each line once, prefixed
    by the configs it concerns when not all of them."""
    seen: dict[str, list[str]] = {}
    ok = [r for r in records if r.get("status") == "ok"]
    for r in ok:
        label = r.get("label") or config_label(r.get("point", {}))
        for line in (x for k in keys for x in r.get(k, [])):
            seen.setdefault(line, []).append(label)
    out = []
    for line, labels in seen.items():
        who = "" if len(labels) == len(ok) else f"[{', '.join(labels)}] "
        out.append(who + line)
    return out
