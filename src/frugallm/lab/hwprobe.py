"""Measure this machine's roofline ceilings (memory bandwidth, matmul FLOP/s per dtype) with torch.

Besides the plain-read bandwidth (the hardware ceiling), it measures the *attainable* bandwidth of a
batch-1 matrix-vector product (``F.linear`` of one token through a weight far larger than the caches)
per weight dtype: that is what decode actually streams at, and on CPUs it is often several times lower.

``probe(device)`` returns a :class:`~frugallm.lab.hardware.HardwareSpec` (``source="probed"``);
``probe_result`` returns the full :class:`ProbeResult` (CPU model, cores, caches, every sample).
Results are cached as JSON in ``$FRUGALLM_CACHE_DIR`` (default: the platform user cache dir), keyed
by device and torch thread count, because both change the numbers; ``refresh=True`` re-measures.

The measurements themselves (medians of timed runs) are in :mod:`frugallm.lab.hwmeasure`. The full probe takes
about 10-20 s on a 2-core CPU; ``quick=True`` (small buffers, 2 runs) takes well under a second.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from frugallm.lab.hardware import HardwareSpec
from frugallm.lab.hwmeasure import (
    Measurement,
    ProbeSettings,
    bandwidth,
    cache_sizes,
    cpu_model_name,
    gemv_bandwidth,
    matmul_peak,
    resolve_device,
)

CACHE_VERSION = 2  # 2: gemv_* measurements and HardwareSpec.gemv_bandwidth_gbs
PROBE_MAX_AGE_S = 30 * 86400  # older probes are flagged (drivers, BIOS and torch builds change)


@dataclass(frozen=True)
class ProbeResult:
    """The probed spec plus everything needed to judge (and reproduce) the numbers."""

    spec: HardwareSpec
    device: str
    cpu_model: str
    logical_cores: int | None
    physical_cores: int | None
    cache_bytes: dict[str, int]  # "L1d", "L1i", "L2", "L3" -> bytes (CPU 0)
    torch_version: str
    num_threads: int
    gpu_name: str | None
    quick: bool
    measurements: dict[str, Measurement]  # "read_bw", "copy_bw", "matmul_fp32", "gemv_fp32", ...
    skipped: dict[str, str]  # measurement name -> why it was not measured
    elapsed_s: float
    timestamp: float
    version: int = CACHE_VERSION
    # 1-min load average when the probe started and ended (None: unknown, e.g. a cache from before it was kept).
    # Other processes on the cores lower every peak, and MFU / MBU against low peaks read high.
    loadavg_1m: float | None = None

    @property
    def age_s(self) -> float:
        """Seconds since the probe was measured."""
        return max(0.0, time.time() - self.timestamp)

    @property
    def busy(self) -> bool | None:
        """Whether the machine was busy while probing (load average above half the logical cores)."""
        if self.loadavg_1m is None:
            return None
        return False if self.device.startswith("cuda") else is_busy(self.loadavg_1m)

    def notes(self) -> list[str]:
        """What a reader should know before trusting figures against this probe (empty when nothing)."""
        out = []
        cores = psutil.cpu_count(logical=True) or 1
        if self.busy:
            out.append(f"hardware probe measured on a busy machine (load average {self.loadavg_1m:.1f} on {cores} "
                       "logical cores): its peaks are low, so MFU / MBU against them read high; rerun "
                       "`frugallm hw probe --refresh` on a quiet machine")
        elif self.loadavg_1m is None and not self.device.startswith("cuda"):
            out.append("hardware probe has no recorded load average (an old cache): it may have been measured on a "
                       "busy machine; `frugallm hw probe --refresh` records it")
        if self.age_s > PROBE_MAX_AGE_S:
            out.append(f"hardware probe is {self.age_s / 86400:.0f} days old")
        if self.quick:
            out.append("hardware probe is a quick one (small buffers, 2 runs): its peaks are rough")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        d = dict(d)
        d["spec"] = HardwareSpec.from_dict(d["spec"])
        d["measurements"] = {
            k: Measurement(**{**m, "samples": tuple(m["samples"])}) for k, m in d["measurements"].items()
        }
        return cls(**d)


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """``$FRUGALLM_CACHE_DIR`` or the platform user cache dir for frugallm."""
    env = os.environ.get("FRUGALLM_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("frugallm"))


def cache_path(device: str = "cpu", quick: bool = False) -> Path:
    """Where the probe of ``device`` at the current torch thread count is cached."""
    dev = resolve_device(device)
    tag = f"{dev.type}{dev.index if dev.index is not None else ''}-t{torch.get_num_threads()}"
    return cache_dir() / f"hwprobe-{tag}{'-quick' if quick else ''}.json"


def _load_cached(path: Path) -> ProbeResult | None:
    try:
        d = json.loads(path.read_text())
        if d.get("version") != CACHE_VERSION or d.get("torch_version") != torch.__version__:
            return None  # stale format or a different torch build: measure again
        return ProbeResult.from_dict(d)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or corrupt cache is not an error, just a reason to measure


def loadavg_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on this platform
        return None


def is_busy(load: float | None) -> bool:
    """A 1-min load average above half the logical cores: other work competes for the cores."""
    return load is not None and load > 0.5 * (psutil.cpu_count(logical=True) or 1)


def _save(path: Path, result: ProbeResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    tmp.replace(path)  # atomic, so a concurrent reader never sees half a file


# --------------------------------------------------------------------------------------------- probe


def measure(device: str = "cpu", quick: bool = False) -> ProbeResult:
    """Run the measurements now (no cache). Use :func:`probe_result` to go through the cache."""
    dev = resolve_device(device)
    s = ProbeSettings.quick() if quick else ProbeSettings()
    load_before = loadavg_1m()
    start = time.perf_counter()
    measurements = bandwidth(dev, s)
    skipped: dict[str, str] = {}
    for dtype in ("fp32", "bf16", "fp16", "int8"):
        try:
            measurements[f"matmul_{dtype}"] = matmul_peak(dtype, dev, s)
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            # e.g. torch._int_mm missing or not built for this device/shape; a reason beats a crash.
            skipped[f"matmul_{dtype}"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for dtype in ("fp32", "bf16", "fp16"):
        try:
            measurements[f"gemv_{dtype}"] = gemv_bandwidth(dtype, dev, s)
        except (RuntimeError, NotImplementedError) as e:
            skipped[f"gemv_{dtype}"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    if dev.type == "cuda":
        mem_bytes = int(torch.cuda.get_device_properties(dev).total_memory)
    else:
        mem_bytes = int(psutil.virtual_memory().total)
    cpu_model = cpu_model_name()
    peaks = {k.removeprefix("matmul_"): m.value for k, m in measurements.items() if k.startswith("matmul_")}
    gemv = {k.removeprefix("gemv_"): m.value for k, m in measurements.items() if k.startswith("gemv_")}
    spec = HardwareSpec(
        name=f"local {dev}: {gpu_name or cpu_model}" + ("" if gpu_name else f" x{torch.get_num_threads()}t"),
        mem_bandwidth_gbs=measurements["read_bw"].value,  # decode streams weights: reads dominate
        peak_flops=peaks,
        mem_bytes=mem_bytes,
        source="probed",
        gemv_bandwidth_gbs=gemv or None,
    )
    return ProbeResult(
        spec=spec,
        device=str(dev),
        cpu_model=cpu_model,
        logical_cores=psutil.cpu_count(logical=True),
        physical_cores=psutil.cpu_count(logical=False),
        cache_bytes=cache_sizes(),
        torch_version=torch.__version__,
        num_threads=torch.get_num_threads(),
        gpu_name=gpu_name,
        quick=quick,
        measurements=measurements,
        skipped=skipped,
        elapsed_s=time.perf_counter() - start,
        timestamp=time.time(),
        loadavg_1m=_max_load(load_before, loadavg_1m()),
    )


def _max_load(*loads: float | None) -> float | None:
    known = [x for x in loads if x is not None]
    return max(known) if known else None


def probe_result(device: str = "cpu", refresh: bool = False, quick: bool = False) -> ProbeResult:
    """The cached probe of ``device`` (measured and cached first if absent or ``refresh``).

    A cached CPU probe that was taken on a busy machine (or whose load is unknown) is measured again when the
    machine is quiet now; while it stays busy the cached one is returned and its :meth:`ProbeResult.notes`
    say so.
    """
    path = cache_path(device, quick)
    if not refresh:
        cached = _load_cached(path)
        stale = cached is not None and cached.busy is not False and not cached.device.startswith("cuda")
        if cached is not None and not (stale and not is_busy(loadavg_1m())):
            return cached
    result = measure(device, quick)
    _save(path, result)
    return result


def probe(device: str = "cpu", refresh: bool = False, quick: bool = False) -> HardwareSpec:
    """This machine's measured :class:`HardwareSpec` for ``device`` (cached; see module docstring)."""
    return probe_result(device, refresh, quick).spec
