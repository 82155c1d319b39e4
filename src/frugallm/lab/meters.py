"""Meters for one benchmark point: latency summaries, peak memory, and energy.

Each meter says how it measured, because the numbers are only comparable between runs of one method:

* peak RSS: the process high-water mark cannot be reset in-process, so :func:`peak_rss_bytes` only
  grows; :class:`RssSampler` samples RSS every 20 ms to give the peak of one point;
* energy: NVML on CUDA, else Linux RAPL package counters (whole package, other processes included),
  else an estimate = process CPU seconds x ``watts_per_core``; ``EnergyMeter.method`` says which.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import psutil
import torch

DEFAULT_WATTS_PER_CORE = 10.0
RSS_SAMPLE_S = 0.02


def summarize(values: Iterable[float]) -> dict[str, float] | None:
    """n, mean, std, cv, min, p50, p90, p99, max (linear-interpolated percentiles); None when empty."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None

    def pct(q: float) -> float:
        pos = (len(xs) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    mean = statistics.fmean(xs)
    std = statistics.pstdev(xs) if len(xs) > 1 else 0.0
    return {"n": len(xs), "mean": mean, "std": std, "cv": std / mean if mean else 0.0, "min": xs[0],
            "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": xs[-1]}


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssSampler:
    """Largest RSS seen by a background thread while active (``with RssSampler() as s: ...; s.peak``)."""

    def __init__(self, interval_s: float = RSS_SAMPLE_S) -> None:
        self.interval_s, self.peak = interval_s, 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


class EnergyMeter:
    """Cumulative energy in joules from one source; ``method`` labels it everywhere it is shown."""

    method = ""
    note = ""

    def read(self) -> float:
        raise NotImplementedError


class NvmlMeter(EnergyMeter):
    method, note = "nvml", "NVML total energy of the GPU (the GPU board only, not the host)"

    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.read()  # raises on GPUs without the energy counter (pre-Volta)

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3  # mJ -> J


class RaplMeter(EnergyMeter):
    method, note = "rapl", "Linux powercap RAPL package counters: the whole CPU package, other processes included"

    def __init__(self, root: Path = Path("/sys/class/powercap")) -> None:
        # Top-level zones only (intel-rapl:N): sub-zones (intel-rapl:N:M) are already inside them.
        self._zones = [z for z in sorted(root.glob("intel-rapl:*")) if z.name.count(":") == 1]
        if not self._zones:
            raise OSError("no RAPL zones")
        self._max = [int((z / "max_energy_range_uj").read_text()) for z in self._zones]
        self._last = self._raw()  # raises PermissionError when not readable (the usual case)
        self._total = 0.0

    def _raw(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self._zones]

    def read(self) -> float:
        now = self._raw()
        for i, (a, b) in enumerate(zip(self._last, now, strict=True)):
            self._total += (b - a if b >= a else b + self._max[i] - a) / 1e6  # the counter wraps
        self._last = now
        return self._total


class EstimatedMeter(EnergyMeter):
    method = "estimated"

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> None:
        self.watts_per_core = watts_per_core
        self.note = f"estimated: process CPU seconds x {watts_per_core:g} W per busy core (not measured)"
        self._proc = psutil.Process()

    def read(self) -> float:
        t = self._proc.cpu_times()
        return (t.user + t.system) * self.watts_per_core


def make_energy_meter(device: str, watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> EnergyMeter:
    """NVML for a CUDA device (pynvml importable), else readable RAPL, else the CPU-time estimate."""
    if device.startswith("cuda"):
        try:
            return NvmlMeter(torch.device(device).index or 0)
        except Exception:  # noqa: BLE001 - pynvml missing, no driver, no energy counter: fall back
            pass
    try:
        return RaplMeter()
    except (OSError, ValueError):
        return EstimatedMeter(watts_per_core)
