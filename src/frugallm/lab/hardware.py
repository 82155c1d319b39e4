"""The roofline's view of a device: :class:`HardwareSpec`, memory bandwidth and peak FLOP/s per dtype.

Two numbers matter for LLM inference (memory bandwidth and peak matmul FLOP/s per dtype) plus memory
capacity. ``gemv_bandwidth_gbs`` (optional) is the *attainable* weight-streaming bandwidth of batch-1
matrix-vector products per weight dtype (``fp32``/``bf16``/``fp16``), as measured by the probe: on CPUs
PyTorch's GEMV kernels stream well below the plain-read bandwidth, so the roofline predicts decode time
with it when present. ``mem_bandwidth_gbs`` stays the hardware ceiling (MBU is measured against it).

This module is the bottom of the hardware layer: :mod:`frugallm.lab.hwprobe` builds specs by measuring,
:mod:`frugallm.lab.hwspecs` names datasheet and TOML specs (and resolves ``local`` through the probe).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from frugallm.errors import FrugalError

DTYPES = ("fp32", "bf16", "fp16", "int8")
GEMV_DTYPES = ("fp32", "bf16", "fp16")
SOURCES = ("datasheet", "probed", "custom")


@dataclass(frozen=True)
class HardwareSpec:
    """Roofline ceilings of one device.

    ``peak_flops`` maps a dtype name (``fp32``, ``bf16``, ``fp16``, ``int8``) to dense matmul FLOP/s
    (OP/s for int8); a dtype that is missing is one the device cannot run fast (or was not measured).
    ``gemv_bandwidth_gbs`` maps a weight dtype to the attainable batch-1 matrix-vector bandwidth (GB/s);
    None (or a missing dtype) means "assume the peak ``mem_bandwidth_gbs``".
    """

    name: str
    mem_bandwidth_gbs: float
    # A dict is not hashable, so it is left out of the hash (frozen dataclasses hash all fields).
    peak_flops: dict[str, float] = field(hash=False)
    mem_bytes: int | None = None
    source: str = "custom"
    gemv_bandwidth_gbs: dict[str, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not self.mem_bandwidth_gbs or self.mem_bandwidth_gbs <= 0:
            raise FrugalError(
                f"hardware spec {self.name!r}: mem_bandwidth_gbs must be positive, "
                f"got {self.mem_bandwidth_gbs}"
            )
        if not self.peak_flops:
            raise FrugalError(f"hardware spec {self.name!r}: peak_flops needs at least one dtype")
        for dtype, value in self.peak_flops.items():
            if dtype not in DTYPES:
                raise FrugalError(
                    f"hardware spec {self.name!r}: unknown dtype {dtype!r} in peak_flops; "
                    f"valid: {', '.join(DTYPES)}"
                )
            if value <= 0:
                raise FrugalError(f"hardware spec {self.name!r}: peak_flops[{dtype!r}] must be positive")
        if self.mem_bytes is not None and self.mem_bytes <= 0:
            raise FrugalError(f"hardware spec {self.name!r}: mem_bytes must be positive when given")
        for dtype, value in (self.gemv_bandwidth_gbs or {}).items():
            if dtype not in GEMV_DTYPES:
                raise FrugalError(
                    f"hardware spec {self.name!r}: unknown dtype {dtype!r} in gemv_bandwidth_gbs; "
                    f"valid: {', '.join(GEMV_DTYPES)}"
                )
            if not value or value <= 0:
                raise FrugalError(f"hardware spec {self.name!r}: gemv_bandwidth_gbs[{dtype!r}] must be positive")
        if self.source not in SOURCES:
            raise FrugalError(
                f"hardware spec {self.name!r}: source must be one of {', '.join(SOURCES)}, "
                f"got {self.source!r}"
            )

    @property
    def mem_bandwidth(self) -> float:
        """Memory bandwidth in bytes/s."""
        return self.mem_bandwidth_gbs * 1e9

    def gemv_bandwidth(self, dtype: str | None) -> float:
        """Attainable weight-streaming bandwidth (bytes/s) for ``dtype`` weights; the peak when unknown."""
        gemv = self.gemv_bandwidth_gbs or {}
        return gemv[dtype] * 1e9 if dtype in gemv else self.mem_bandwidth

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; raises a :class:`FrugalError` naming the available dtypes."""
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise FrugalError(
                f"hardware spec {self.name!r} has no peak for {dtype!r}; "
                f"available: {', '.join(self.peak_flops)}"
            ) from None

    def ridge_point(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) above which ``dtype`` matmuls are compute-bound."""
        return self.peak(dtype) / self.mem_bandwidth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> HardwareSpec:
        """Build from a dict (TOML table, JSON cache); unknown or missing keys raise FrugalError."""
        allowed = {"name", "mem_bandwidth_gbs", "peak_flops", "mem_bytes", "source", "gemv_bandwidth_gbs"}
        extra = set(d) - allowed
        if extra:
            raise FrugalError(
                f"hardware spec: unknown field(s) {', '.join(sorted(extra))}; "
                f"valid: {', '.join(sorted(allowed))}"
            )
        missing = {"name", "mem_bandwidth_gbs", "peak_flops"} - set(d)
        if missing:
            raise FrugalError(f"hardware spec: missing field(s) {', '.join(sorted(missing))}")
        if not isinstance(d["peak_flops"], dict):
            raise FrugalError("hardware spec: peak_flops must be a table of dtype = FLOP/s")
        gemv = d.get("gemv_bandwidth_gbs")
        if gemv is not None and not isinstance(gemv, dict):
            raise FrugalError("hardware spec: gemv_bandwidth_gbs must be a table of dtype = GB/s")
        try:
            mem = d.get("mem_bytes")
            return cls(
                name=str(d["name"]),
                mem_bandwidth_gbs=float(d["mem_bandwidth_gbs"]),
                peak_flops={str(k): float(v) for k, v in d["peak_flops"].items()},
                mem_bytes=None if mem is None else int(mem),
                source=source or str(d.get("source", "custom")),
                gemv_bandwidth_gbs=None if gemv is None else {str(k): float(v) for k, v in gemv.items()},
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, FrugalError):
                raise
            raise FrugalError(f"hardware spec: invalid value: {e}") from None
