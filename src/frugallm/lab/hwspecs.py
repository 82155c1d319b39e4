"""Hardware ceilings for the roofline model: datasheet specs, custom TOML specs, the local probe.

A :class:`HardwareSpec` is two numbers that matter for LLM inference (memory bandwidth and peak
matmul FLOP/s per dtype) plus memory capacity. ``load_hw_spec`` resolves a name from
:data:`DATASHEET_SPECS`, a path to a TOML file, or ``"local"``/``"auto"`` (the cached result of
:func:`frugallm.lab.hwprobe.probe`).

``gemv_bandwidth_gbs`` (optional) is the *attainable* weight-streaming bandwidth of batch-1 matrix-vector
products per weight dtype (``fp32``/``bf16``/``fp16``), as measured by the probe: on CPUs PyTorch's GEMV
kernels stream well below the plain-read bandwidth, so the roofline predicts decode time with it when
present. ``mem_bandwidth_gbs`` stays the hardware ceiling (MBU is measured against it). Datasheet specs
leave it unset.

TOML format (``peak_flops`` in FLOP/s, dense; ``mem_bytes`` and ``gemv_bandwidth_gbs`` optional)::

    name = "my-gpu"
    mem_bandwidth_gbs = 936.0
    mem_bytes = 25769803776
    [peak_flops]
    fp32 = 35.6e12
    fp16 = 142e12
    [gemv_bandwidth_gbs]  # optional
    fp16 = 850.0
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from frugallm.errors import FrugalError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

DTYPES = ("fp32", "bf16", "fp16", "int8")
GEMV_DTYPES = ("fp32", "bf16", "fp16")
SOURCES = ("datasheet", "probed", "custom")
LOCAL_NAMES = ("local", "auto")

GiB = 1 << 30


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


def _tflops(**peaks: float) -> dict[str, float]:
    return {k: v * 1e12 for k, v in peaks.items()}


# Dense (no 2:4 sparsity) tensor-core peaks from the vendors' datasheets / whitepapers. "fp32" is the
# non-tensor-core FP32 rate: PyTorch does not use TF32 for fp32 matmuls unless asked to.
DATASHEET_SPECS: dict[str, HardwareSpec] = {
    spec.name: spec
    for spec in (
        # NVIDIA H100 SXM5 80GB datasheet: 3.35 TB/s HBM3, 67 TF FP32, 989 TF BF16/FP16, 1979 TOPS INT8.
        HardwareSpec("h100-sxm", 3350.0, _tflops(fp32=67.0, bf16=989.4, fp16=989.4, int8=1978.9),
                     80 * GiB, "datasheet"),
        # NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 141 GB; same compute as H100 SXM.
        HardwareSpec("h200", 4800.0, _tflops(fp32=67.0, bf16=989.4, fp16=989.4, int8=1978.9),
                     141 * GiB, "datasheet"),
        # NVIDIA A100 80GB SXM datasheet: 2039 GB/s HBM2e, 19.5 TF FP32, 312 TF BF16/FP16, 624 TOPS INT8.
        HardwareSpec("a100-80gb-sxm", 2039.0, _tflops(fp32=19.5, bf16=312.0, fp16=312.0, int8=624.0),
                     80 * GiB, "datasheet"),
        # NVIDIA L4 datasheet: 300 GB/s GDDR6, 30.3 TF FP32, 121 TF BF16/FP16, 242 TOPS INT8 (dense).
        HardwareSpec("l4", 300.0, _tflops(fp32=30.3, bf16=121.0, fp16=121.0, int8=242.5),
                     24 * GiB, "datasheet"),
        # Ada whitepaper, RTX 4090: 1008 GB/s GDDR6X, 82.6 TF FP32; FP16/BF16 with FP32 accumulate
        # (what PyTorch uses) 165.2 TF; INT8 660.6 TOPS.
        HardwareSpec("rtx-4090", 1008.0, _tflops(fp32=82.6, bf16=165.2, fp16=165.2, int8=660.6),
                     24 * GiB, "datasheet"),
    )
}

ALIASES = {"h100": "h100-sxm", "a100": "a100-80gb-sxm", "a100-80gb": "a100-80gb-sxm",
           "rtx4090": "rtx-4090", "4090": "rtx-4090", "h200-sxm": "h200"}


def valid_names() -> list[str]:
    """Every name ``load_hw_spec`` accepts besides a TOML path."""
    return sorted(DATASHEET_SPECS) + sorted(ALIASES) + list(LOCAL_NAMES)


def load_toml_spec(path: str | Path) -> HardwareSpec:
    """Read a custom spec from a TOML file (fields as :class:`HardwareSpec`, ``source`` = custom)."""
    if tomllib is None:  # pragma: no cover - 3.10 without tomli
        raise FrugalError("reading TOML specs on Python 3.10 needs the 'tomli' package: pip install tomli")
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise FrugalError(f"hardware spec file not found: {p}") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FrugalError(f"cannot read hardware spec {p}: {e}") from None
    data.setdefault("name", p.stem)
    return HardwareSpec.from_dict(data, source="custom")


def load_hw_spec(name_or_path: str | Path) -> HardwareSpec:
    """Resolve a datasheet name (case-insensitive, aliases allowed), a ``.toml`` path, or local/auto.

    ``"local"`` and ``"auto"`` return the probed spec of this machine (CUDA device 0 when available,
    else the CPU): the cached probe when there is one, otherwise a probe is run (~20 s) and cached.
    """
    if isinstance(name_or_path, Path):
        return load_toml_spec(name_or_path)
    text = str(name_or_path).strip()
    key = text.lower()
    if key in LOCAL_NAMES:
        from frugallm.lab import hwprobe  # torch is imported only when a probe is wanted

        return hwprobe.probe(hwprobe.default_device())
    key = ALIASES.get(key, key)
    if key in DATASHEET_SPECS:
        return DATASHEET_SPECS[key]
    if key.endswith(".toml") or Path(text).is_file():
        return load_toml_spec(text)
    raise FrugalError(
        f"unknown hardware spec {text!r}; valid names: {', '.join(valid_names())} "
        "(or a path to a .toml spec file)"
    )
