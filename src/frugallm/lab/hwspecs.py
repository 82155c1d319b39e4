"""Named hardware ceilings for the roofline: datasheet specs, custom TOML specs, and ``local``.

``load_hw_spec`` resolves what ``--hw`` takes: a name from :data:`DATASHEET_SPECS` (or an alias), a path
to a TOML file, or ``"local"``/``"auto"``: the cached result of :func:`frugallm.lab.hwprobe.probe`. The
spec type itself, :class:`~frugallm.lab.hardware.HardwareSpec`, lives one layer down in
:mod:`frugallm.lab.hardware`, so the probe builds specs without importing this module.

Datasheet specs leave ``gemv_bandwidth_gbs`` unset (they have no attainable-bandwidth measurement).

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
from pathlib import Path

from frugallm.errors import FrugalError
from frugallm.lab.hardware import HardwareSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

LOCAL_NAMES = ("local", "auto")

GiB = 1 << 30


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
        from frugallm.lab import hwprobe  # imported here: torch loads only when a probe is wanted

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
