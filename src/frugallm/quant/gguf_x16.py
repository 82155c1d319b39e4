"""Which GGUF segments :class:`~frugallm.quant.gguf_linear.GGUFLinear` repacks into an interleaved "x16" layout at
load, and the ops that repack and unpack them.

Q4_K and Q6_K (``csrc/gguf_x16.cpp``, "x16b") and the 32-value block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
(``csrc/gguf_x16_b32.cpp``): 16 weight rows interleaved so that vector lanes are output columns (no horizontal
sums), the file's bytes only, replacing the stored ones. Their few-row passes are exact like ``gguf_linear``'s and
each row of an r-row pass is bit-identical to its one-row pass; unpacking gives the stored rows back bit for bit,
so prefill and embedding lookups dequantize the file's blocks as before. With ``act_quant="q8"`` Q4_K / Q6_K stay
repacked (``gguf_x16_linear_q8``: int8 activations on the x16b layouts) and the other types keep the stored layout.

The repack is on at AVX-512 and above, and on AVX2 for every type but Q6_K in exact mode (slower there at one
row); ``FRUGALLM_GGUF_X16=0`` keeps the stored layout everywhere, ``1`` repacks every type, a list of type names
those types only (A/B switches for benchmarks).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from frugallm import cpu, native
from frugallm.errors import FrugalError

Q = GGMLQuantizationType
X16_KERNEL = "gguf_x16"  # csrc/gguf_x16.cpp: Q4_K and Q6_K with 16 rows interleaved ("x16b" layout)
X16_B32_KERNEL = "gguf_x16_b32"  # csrc/gguf_x16_b32.cpp: the 32-value block types, 16 rows interleaved
STORED_KERNEL = "gguf_linear"  # csrc/gguf_linear.cpp dequantizes the unpacked rows (prefill, embeddings)

RepackOps = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]  # (repack(w), unpack(w, n, rows))


def _ops(qtype: int) -> RepackOps:
    """(repack, unpack) of ``qtype``'s x16 layout, looked up when called (the kernels load lazily)."""
    if qtype in (Q.Q4_K, Q.Q6_K):
        name = "q4k" if qtype == Q.Q4_K else "q6k"
        return (lambda w: getattr(torch.ops.frugallm, f"gguf_{name}_x16_repack")(w),
                lambda w, n, rows: getattr(torch.ops.frugallm, f"gguf_{name}_x16_unpack")(w, n, rows))
    return (lambda w: torch.ops.frugallm.gguf_x16_b32_repack(w, qtype),
            lambda w, n, rows: torch.ops.frugallm.gguf_x16_b32_unpack(w, qtype, n, rows))


X16_TYPES = {t: _ops(int(t)) for t in (Q.Q4_K, Q.Q6_K)}  # the types csrc/gguf_x16.cpp repacks
X16_B32_TYPES = {t: _ops(int(t)) for t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)}  # csrc/gguf_x16_b32.cpp's
X16_LAYOUTS = {**X16_TYPES, **X16_B32_TYPES}  # every type GGUFLinear may repack: qtype -> (repack, unpack)
X16_Q8_TYPES = frozenset({Q.Q4_K, Q.Q6_K})  # x16 layouts with an int8-activation kernel (gguf_x16_linear_q8)


def repacks(qtype: int, rows: int, device: torch.device, act_quant: str | None = None) -> bool:
    """Whether a segment runs repacked (csrc/gguf_x16.cpp: Q4_K, Q6_K; csrc/gguf_x16_b32.cpp: the 32-value block types
    Q4_0 ... Q8_0), a multiple of 16 rows, on this CPU's kernels: at AVX-512 or above every type; at AVX2 the
    32-value types, Q4_K, and with ``act_quant="q8"`` Q6_K too (AVX2, one row, 1 thread, under load: the Q4_K x16
    kernel 1.16-1.45x the stored-block one, Q6_K's 0.89-0.98x; with int8 activations x16 is 1.26-1.70x
    ``gguf_linear_q8`` for both), unless ``FRUGALLM_GGUF_X16=0`` (keeps the stored layout: an A/B switch for
    benchmarks). ``FRUGALLM_GGUF_X16=1`` repacks every type (Q6_K on AVX2 too); a list of type names
    (``FRUGALLM_GGUF_X16=Q4_K,Q8_0``) does what ``1`` does for those types only (a per-type A/B)."""
    flag = os.environ.get("FRUGALLM_GGUF_X16", "auto").strip()
    if flag not in ("0", "1", "auto"):
        names = {n.strip().upper() for n in flag.split(",") if n.strip()}
        known = {GGMLQuantizationType(t).name for t in X16_LAYOUTS}
        if not names or not names <= known:
            raise FrugalError(f"FRUGALLM_GGUF_X16={flag!r}: expected 0, 1, auto or type names among "
                              f"{', '.join(sorted(known))}")
        if GGMLQuantizationType(qtype).name not in names:
            return False
    b32 = qtype in X16_B32_TYPES
    at_avx2 = b32 or qtype == Q.Q4_K or (act_quant == "q8" and qtype in X16_Q8_TYPES)
    return (flag != "0" and (flag != "auto" or at_avx2 or cpu.at_least("avx512")) and qtype in X16_LAYOUTS
            and rows % 16 == 0 and device.type == "cpu" and native.usable(X16_B32_KERNEL if b32 else X16_KERNEL)
            and native.usable(STORED_KERNEL))


def drop_file_pages(t: torch.Tensor) -> None:
    """Unmap this process's pages of ``t`` when they lie in a read-only file mapping (the GGUF memmap a repacked
    segment no longer reads), so RSS counts the weights once. Safe for any owner: a read-only file page is read
    from the file again if anyone touches it; anything else (anonymous or writable memory) is left alone."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    start, end = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE, hi // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= start:
        return
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                a, b = (int(v, 16) for v in parts[0].split("-"))
                if a <= lo < b:
                    if hi <= b and len(parts) >= 6 and parts[5].startswith("/") and "w" not in parts[1]:
                        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                                                  mmap.MADV_DONTNEED)
                    return
    except (OSError, AttributeError):  # no /proc or no madvise: the pages just stay mapped
        return
