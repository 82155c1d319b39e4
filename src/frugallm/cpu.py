"""The CPU's instruction-set level, read once from its feature flags (the way ggml picks kernels).

Levels, lowest first: ``generic`` (no SIMD assumed beyond the compiler's baseline), ``avx2`` (AVX2 + FMA + F16C,
every x86 CPU since 2013-2015), ``avx512`` (AVX-512 F/BW/VL/DQ), ``avx512bf16`` (plus AVX512-BF16 and VNNI).
``FRUGALLM_ISA=avx2`` (or ``generic``) caps the level below what the CPU has, so an AVX-512 machine runs and
tests the variants an AVX2-only CPU would; it never raises the level above what the CPU can execute.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

from frugallm.errors import FrugalError

LEVELS = ("generic", "avx2", "avx512", "avx512bf16")
_NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                   "avx512_vnni"},
}


@functools.lru_cache(maxsize=1)
def flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def hardware_level() -> str:
    """The highest level the CPU itself supports."""
    if not is_x86():
        return "generic"
    have = flags()
    best = "generic"
    for level in LEVELS[1:]:
        if _NEEDS[level] <= have:
            best = level
    return best


def level() -> str:
    """The level kernels and defaults use: the hardware's, capped by ``FRUGALLM_ISA``."""
    hw = hardware_level()
    want = os.environ.get("FRUGALLM_ISA", "").strip().lower()
    if not want or want == "native":
        return hw
    if want not in LEVELS:
        raise FrugalError(f"FRUGALLM_ISA={want!r} is not a level; choices: native, {', '.join(LEVELS)}")
    return LEVELS[min(LEVELS.index(want), LEVELS.index(hw))]


def at_least(name: str) -> bool:
    return LEVELS.index(level()) >= LEVELS.index(name)


def fast_bf16() -> bool:
    """Whether bf16 matrix products are fast here (AVX512-BF16 / AMX): elsewhere bf16 is emulated, ~40x
    slower than fp32 (1.5 GFLOP/s measured on an AVX2 EPYC), so defaults must not compute in it."""
    return at_least("avx512bf16") or (is_x86() and "amx_bf16" in flags() and at_least("avx512"))


def onednn_bf16() -> bool:
    """Whether oneDNN's bf16 linear runs here: it needs AVX-512 BW/VL/DQ and refuses otherwise."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return at_least("avx512") and (check is None or bool(check()))


def compile_flags() -> tuple[str, ...]:
    """The ``-march`` flags for native kernels at :func:`level` (the hardware's own level builds natively)."""
    lvl = level()
    if lvl == hardware_level():
        return ("-march=native",)
    return {
        "generic": ("-march=x86-64", "-mtune=generic"),
        "avx2": ("-march=x86-64-v3", "-mtune=generic"),
        "avx512": ("-march=x86-64-v4", "-mtune=generic"),
    }[lvl]
