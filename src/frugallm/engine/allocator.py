"""glibc ``malloc`` settings for tensor-heavy CPU work (what jemalloc/tcmalloc preloading buys, in-process).

glibc hands allocations above its mmap threshold (128 KiB, adapting upwards only as far as chunks are
freed) fresh pages from ``mmap`` and gives them back with ``munmap`` on free, and trims the heap top
whenever 128 KiB of it is free. A prefill pass allocates and frees activation-sized temporaries in every op,
so each of them paid page faults on first touch: ``F.rms_norm`` over ``[512, 576]`` bf16 took 939 us, 145 us
with the settings below (1 thread); both are needed (either alone: no gain). Freed memory then stays in the
process for reuse, so resident memory stays at its high-water mark instead of shrinking between passes.

Allocations from 32 MiB up (glibc's own ceiling for its adaptive threshold: whole embedding tables, large
weights) still get their own mappings. With a 1 GiB threshold they went to the heap too, and a process that
loaded several models one after another (a benchmark sweep) decoded 7 % slower with its later ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_FROM = 32 << 20  # allocations this large get their own mapping
_TRIM_ABOVE = 1 << 30  # free heap top kept up to this much
_done = False


def tune_malloc() -> bool:
    """Apply the settings once per process (Linux/glibc; a no-op elsewhere or with FRUGALLM_NO_MALLOPT=1).
    Returns whether they are in effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("FRUGALLM_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
    return _done
