"""Native CPU kernels: the C++ sources in ``csrc/``, built once per machine and loaded as torch ops.

Each source registers its ops under ``torch.ops.frugallm`` (``TORCH_LIBRARY``). On first use it is
compiled with the system C++ compiler against torch's own headers and libraries
(``-O3 -march=native -fopenmp``, a few seconds) into the cache directory, under a name keyed by the
source, torch's version, the compiler and the CPU, so an edit, an upgrade or another machine gets a
fresh build. The library's ``libgomp.so.1`` resolves to the copy torch has already loaded (same
soname), so ``at::parallel_for`` in a kernel runs on torch's one OpenMP pool: a second pool would make
both stop spin-waiting (see ``AsyncLLM.launch``).

Where no compiler is found or the build fails, :func:`load` logs one warning and returns False, and
callers keep their pure-torch path. ``FRUGALLM_NATIVE=0`` turns native kernels off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    # Lets reductions (dot products, softmax sums) vectorize as trees instead of in-order scalar adds;
    # no -ffinite-math-only, so infinities keep their meaning.
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-std=c++20",
    "-shared",
    "-fPIC",
)


def enabled() -> bool:
    return os.environ.get("FRUGALLM_NATIVE", "1") != "0"


def _compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def _cpu_model() -> str:
    """The CPU's name and feature flags (``-march=native`` code is only valid on a CPU like it)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))


def _build(name: str, cxx: str) -> Path:
    from torch.utils.cpp_extension import include_paths, library_paths

    from frugallm.loading.weight_cache import cache_dir

    source = CSRC / f"{name}.cpp"
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), *(h.read_text() for h in sorted(CSRC.glob("*.h"))), torch.__version__,
                   version, _cpu_model(), " ".join(CFLAGS)]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / "native" / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # concurrent builders each write their own, then rename
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, *CFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()),
           str(source), *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu", "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "compiler failed")
    os.replace(tmp, out)
    for stale in out.parent.glob(f"{name}-*.so"):  # builds of older sources; a process using one keeps it mapped
        if stale != out:
            stale.unlink(missing_ok=True)
    return out


# A library's ops register once per process: a second build of it (another cache directory, an edited
# source) must never be loaded next to the first, which would abort the process.
_loaded: set[str] = set()
_failed: set[str] = set()  # warned once; not retried
_lock = threading.Lock()
_vectorized: dict[str, bool] = {}  # per loaded library: its fast path compiled in


def load(name: str) -> bool:
    """Build (if needed) and load ``csrc/<name>.cpp``; True when its ops are registered and enabled."""
    if not enabled():
        return False
    with _lock:  # two threads loading one library at once would register its ops twice
        if name in _loaded:
            return True
        if name in _failed:
            return False
        cxx = _compiler()
        try:
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX)")
            torch.ops.load_library(str(_build(name, cxx)))
        except Exception as e:  # noqa: BLE001 - any build/load failure means: use the torch path
            log.warning("native kernel %s unavailable (torch fallback in use): %s", name, e)
            _failed.add(name)
            return False
        _loaded.add(name)
        return True


def usable(name: str) -> bool:
    """Whether ``csrc/<name>.cpp`` is enabled, loaded, and built with the CPU features its fast path needs
    (a library that has them reports it through its ``<name>_vectorized`` op; one without that op needs
    none). Callers choose their kernel path with this."""
    if not enabled():
        return False
    known = _vectorized.get(name)  # set once loaded: callers ask per forward pass
    if known is not None:
        return known
    if not load(name):
        return False
    flag = getattr(torch.ops.frugallm, f"{name}_vectorized", None)
    _vectorized[name] = flag is None or bool(flag())
    return _vectorized[name]


def status() -> dict[str, str]:
    """Each kernel in ``csrc/`` and whether it runs here (``frugallm hw probe`` prints this)."""
    out = {}
    for source in sorted(CSRC.glob("*.cpp")):
        name = source.stem
        if not enabled():
            out[name] = "off (FRUGALLM_NATIVE=0)"
        elif not load(name):
            out[name] = "unavailable (build failed or no compiler; torch path in use)"
        else:
            out[name] = "in use" if usable(name) else "built without the CPU features it needs (torch path in use)"
    return out
