"""The measurements behind :mod:`frugallm.lab.hwprobe`: plain-read and copy bandwidth, matmul peaks per dtype,
the batch-1 matrix-vector bandwidth decode streams at, and the CPU's model and cache sizes.

Every measured value is the median over several timed runs; a run repeats the op enough times to last
``target`` seconds (:class:`ProbeSettings`), so fast GPU kernels are not lost in timer and launch noise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from frugallm import cpu
from frugallm.errors import FrugalError

MiB = 1 << 20

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ProbeSettings:
    """How hard to measure. ``quick`` settings are for tests and smoke runs, not for reporting."""

    buffer_bytes: int = 256 * MiB
    reps: int = 7
    target_s: float = 0.08  # one matmul (or one inner-repeated group) lasts about this long
    max_matmul_n: int = 8192
    dtype_budget_s: float = 3.0  # growing the matmul size stops once this is spent
    gemv_bytes: int = 128 * MiB  # weight of the batch-1 matrix-vector probe: well beyond any LLC
    gemv_in: int = 4096  # its input features (a typical hidden size)

    @classmethod
    def quick(cls) -> ProbeSettings:
        return cls(buffer_bytes=8 * MiB, reps=2, target_s=0.004, max_matmul_n=512, dtype_budget_s=0.3,
                   gemv_bytes=4 * MiB, gemv_in=512)


@dataclass(frozen=True)
class Measurement:
    """One measured ceiling: ``value`` is the median of ``samples`` (same unit)."""

    value: float
    unit: str  # "GB/s" or "FLOP/s"
    samples: tuple[float, ...]
    size: str  # what was timed, e.g. "256 MiB fp32" or "n=2048 bf16"
    inner: int  # op repetitions inside one timed run


# ---------------------------------------------------------------------------------------- system info


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FrugalError(f"invalid device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FrugalError(f"device {device!r} requested but CUDA is not available")
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type != "cpu":
        raise FrugalError(f"unsupported probe device {device!r}; supported: cpu, cuda, cuda:N")
    return dev


def cpu_model_name() -> str:
    try:
        import cpuinfo  # py-cpuinfo, optional

        brand = cpuinfo.get_cpu_info().get("brand_raw")
        if brand:
            return str(brand)
    except Exception:  # noqa: BLE001 - optional dependency; any failure falls back to /proc
        pass
    return cpu.model_name() or "unknown"


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def cache_sizes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        sizes[f"L{level}{suffix}"] = size
    return sizes


# ------------------------------------------------------------------------------------------- timing


def _sync_fn(dev: torch.device) -> Callable[[], None]:
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def _time_runs(fn: Callable[[], object], sync: Callable[[], None], reps: int, target_s: float
               ) -> tuple[list[float], int]:
    """Seconds per call of ``fn`` for ``reps`` runs, each repeating it ``inner`` times (~target_s)."""
    fn()  # warm-up: first-call allocations, kernel selection, page faults
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    single = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(10_000, round(target_s / single)))
    per_call = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        per_call.append((time.perf_counter() - t0) / inner)
    return per_call, inner


def bandwidth(dev: torch.device, s: ProbeSettings) -> dict[str, Measurement]:
    sync = _sync_fn(dev)
    n = s.buffer_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)  # filled, so every page is really mapped
    dst = torch.zeros_like(src)
    size = f"{s.buffer_bytes / MiB:.0f} MiB fp32"
    out: dict[str, Measurement] = {}
    # sum() reads every byte once; copy_ reads src and writes dst, counted as 2x (the STREAM
    # convention; write-allocate traffic on CPUs is not counted).
    for name, fn, nbytes in (("read_bw", src.sum, s.buffer_bytes),
                             ("copy_bw", lambda: dst.copy_(src), 2 * s.buffer_bytes)):
        times, inner = _time_runs(fn, sync, s.reps, s.target_s)
        samples = tuple(nbytes / t / 1e9 for t in times)
        out[name] = Measurement(statistics.median(samples), "GB/s", samples, size, inner)
    return out


def _matmul_fn(dtype: str, n: int, dev: torch.device) -> Callable[[], object]:
    if dtype == "int8":
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=dev)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=dev)
        return lambda: torch._int_mm(a, b)
    a = torch.randn(n, n, dtype=_DTYPES[dtype], device=dev)
    b = torch.randn(n, n, dtype=_DTYPES[dtype], device=dev)
    c = torch.empty(n, n, dtype=_DTYPES[dtype], device=dev)
    return lambda: torch.mm(a, b, out=c)


def matmul_peak(dtype: str, dev: torch.device, s: ProbeSettings) -> Measurement:
    """Grow a square matmul until one call lasts ~target_s (or the size/time cap), then time it."""
    sync = _sync_fn(dev)
    n, spent = 128, 0.0
    while True:
        fn = _matmul_fn(dtype, n, dev)
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        t = max(time.perf_counter() - t0, 1e-7)
        spent += 2 * t
        if t >= 0.5 * s.target_s or n >= s.max_matmul_n or spent >= s.dtype_budget_s:
            break
        # Time grows as n^3; aim at target_s, but never more than 4x per step in case small sizes
        # were unrepresentatively slow (thread wake-up), and stay a multiple of 64 for the kernels.
        scale = min(4.0, max(1.25, (s.target_s / t) ** (1 / 3)))
        n = min(s.max_matmul_n, max(n + 64, int(n * scale) // 64 * 64))
    times, inner = _time_runs(fn, sync, s.reps, s.target_s)
    samples = tuple(2 * n**3 / t for t in times)
    return Measurement(statistics.median(samples), "FLOP/s", samples, f"n={n} {dtype}", inner)


def gemv_bandwidth(dtype: str, dev: torch.device, s: ProbeSettings) -> Measurement:
    """Weight bytes streamed per second by a batch-1 ``F.linear`` (decode's matrix-vector product)."""
    sync = _sync_fn(dev)
    dt = _DTYPES[dtype]
    esize = torch.empty((), dtype=dt).element_size()
    k = s.gemv_in
    n = max(64, s.gemv_bytes // (k * esize) // 64 * 64)
    w = torch.randn(n, k, dtype=dt, device=dev)
    x = torch.randn(1, k, dtype=dt, device=dev)
    nbytes = n * k * esize
    times, inner = _time_runs(lambda: torch.nn.functional.linear(x, w), sync, s.reps, s.target_s)
    samples = tuple(nbytes / t / 1e9 for t in times)
    return Measurement(statistics.median(samples), "GB/s", samples, f"[{n}, {k}] {dtype}", inner)

