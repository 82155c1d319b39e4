"""Native CPU kernels: the C++ sources in ``csrc/``, built once per machine and loaded as torch ops.

Each source registers its ops under ``torch.ops.frugallm`` (``TORCH_LIBRARY``). On first use it is
compiled with the system C++ compiler against torch's own headers and libraries (``-O3 -fopenmp`` and the
``-march`` of the CPU's ISA level, :mod:`frugallm.cpu`; a few seconds, one line on stderr) into the cache
directory, under a name keyed by the source, torch's version, the compiler, the CPU and the level, so an edit,
an upgrade, another machine or ``FRUGALLM_ISA=avx2`` gets its own build. A source whose first lines say
``// requires: LEVEL`` is only built where :func:`frugallm.cpu.level` reaches that level: on a CPU below it the
kernel could only run its scalar fallback, slower than torch's, so it is neither built nor used.

The library's ``libgomp.so.1`` resolves to the copy torch has already loaded (same
soname), so ``at::parallel_for`` in a kernel runs on torch's one OpenMP pool: a second pool would make
both stop spin-waiting (see ``AsyncLLM.launch``).

Where no compiler is found or the build fails, :func:`load` logs one warning and returns False, and
callers keep their pure-torch path. ``FRUGALLM_NATIVE=0`` turns native kernels off.

Loading a library runs its code, so a library is only loaded from a folder no one else can write: the
``native`` folder (created ``0700``) and the cache folder holding it must be owned by this user and not
group/world writable (a sticky, root-owned parent such as ``/tmp`` is fine), and so must the ``.so``. Where
they are not (a shared ``FRUGALLM_CACHE_DIR`` or ``XDG_CACHE_HOME``), kernels are built in a private
temporary folder for this process instead (one warning; each process then rebuilds them). Old builds are
removed only when they are this user's own.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from frugallm import cpu
from frugallm.paths import cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CFLAGS = (
    "-O3",
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


@functools.cache  # load() asks on every call; the sources do not change in a process
def required_level(name: str) -> str:
    """The ISA level ``csrc/<name>.cpp`` needs to be worth building (its ``// requires: LEVEL`` line)."""
    head = (CSRC / f"{name}.cpp").read_text()[:4000]
    m = re.search(r"^// requires: (\w+)", head, re.MULTILINE)
    return m.group(1) if m else "generic"


def runnable(name: str) -> bool:
    """Whether this CPU (at ``FRUGALLM_ISA``'s cap) reaches the level ``name`` needs."""
    return cpu.at_least(required_level(name))


def _not_private(path: Path, *, parent: bool = False) -> str | None:
    """Why someone other than this user could write ``path`` (None: no one can). ``parent``: a root-owned
    sticky folder (``/tmp``) is accepted, since no one else can rename or replace what we own in it."""
    if not hasattr(os, "getuid"):  # no POSIX owners (Windows): the profile's ACLs apply
        return None
    st = path.stat() if parent else path.lstat()
    uid = os.getuid()
    if not parent and stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if parent and st.st_uid == 0 and st.st_mode & stat.S_ISVTX:
        return None
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {uid})"
    if st.st_mode & 0o022:
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


_private_dirs: dict[Path, Path] = {}  # unsafe cache folder -> this process's private build folder


def native_dir() -> Path:
    """Where builds are written and loaded from: ``<cache>/native`` when only this user can write it and its
    parent, else a private temporary folder for this process (warned once per cache folder)."""
    d = cache_dir() / "native"
    if d in _private_dirs:
        return _private_dirs[d]
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        d.mkdir(mode=0o700, exist_ok=True)
        reason = _not_private(d.parent, parent=True) or _not_private(d)
    except OSError as e:
        reason = f"{d} cannot be created ({e.strerror})"
    if reason is None:
        return d
    tmp = Path(tempfile.mkdtemp(prefix="frugallm-native-"))
    atexit.register(shutil.rmtree, tmp, True)
    log.warning("native kernels: not using the cache folder %s: %s. Building in the private folder %s for this "
                "process instead (slower start); use a FRUGALLM_CACHE_DIR only you can write (chmod 700)", d, reason,
                tmp)
    _private_dirs[d] = tmp
    return tmp


def _build_path(name: str, cxx: str) -> tuple[Path, list[str]]:
    """Where the build of ``name`` for this compiler, torch, CPU and ISA level lives, and its flags."""
    source = CSRC / f"{name}.cpp"
    flags = [*CFLAGS, *cpu.compile_flags()]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), *(h.read_text() for h in sorted(CSRC.glob("*.h"))), torch.__version__,
                   version, cpu.model_name(), " ".join(sorted(cpu.flags())), cpu.level(), " ".join(flags)]).encode()
    ).hexdigest()[:16]
    return native_dir() / f"{name}-{cpu.level()}-{key}.so", flags


def _build(name: str, cxx: str) -> Path:
    from torch.utils.cpp_extension import include_paths, library_paths

    source = CSRC / f"{name}.cpp"
    out, flags = _build_path(name, cxx)
    if out.exists() and _not_private(out) is None:
        return out
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # concurrent builders each write their own, then rename
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()),
           str(source), *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu", "-o", str(tmp)]
    msg = f"frugallm: building native kernel {name} for {cpu.level()} (first use only)..."
    if sys.stderr.isatty():  # progress for people at a terminal; scripts and CLI errors keep stderr clean
        print(msg, file=sys.stderr, flush=True)
    log.info(msg)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "compiler failed")
    os.replace(tmp, out)
    _remove_stale(out, name)
    return out


def _remove_stale(out: Path, name: str) -> None:
    """Remove this user's builds of older sources at this level (other levels stay: FRUGALLM_ISA switches between
    them; a process using one keeps it mapped). Files of other users are never touched."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    for stale in out.parent.glob(f"{name}-{cpu.level()}-*.so"):
        try:
            st = stale.lstat()
            if stale != out and stat.S_ISREG(st.st_mode) and (uid is None or st.st_uid == uid):
                stale.unlink()
        except OSError:
            continue


def built(name: str) -> bool:
    """Whether a build of ``name`` for this machine is already in the cache (nothing is compiled)."""
    cxx = _compiler()
    return cxx is not None and _build_path(name, cxx)[0].exists()


# A library's ops register once per process: a second build of it (another cache directory, an edited
# source) must never be loaded next to the first, which would abort the process.
_loaded: set[str] = set()
_failed: set[str] = set()  # warned once; not retried
_lock = threading.Lock()
_vectorized: dict[str, bool] = {}  # per loaded library: its fast path compiled in


def load(name: str) -> bool:
    """Build (if needed) and load ``csrc/<name>.cpp``; True when its ops are registered and enabled."""
    if not enabled() or not runnable(name):
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
            path = _build(name, cxx)
            if (reason := _not_private(path.parent, parent=True) or _not_private(path)) is not None:
                raise RuntimeError(f"not loading {path}: {reason}")
            torch.ops.load_library(str(path))
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


def status(build: bool = True) -> dict[str, str]:
    """Each kernel in ``csrc/`` and whether it runs here (``frugallm hw probe`` prints this); with
    ``build=False`` nothing is compiled: kernels not built yet say so."""
    out = {}
    for source in sorted(CSRC.glob("*.cpp")):
        name = source.stem
        if not enabled():
            out[name] = "off (FRUGALLM_NATIVE=0)"
        elif not runnable(name):
            out[name] = f"not built: needs {required_level(name)}, this CPU runs {cpu.level()} (torch path in use)"
        elif not build and name not in _loaded and not built(name):
            out[name] = "not built yet (built on first use)"
        elif not load(name):
            out[name] = "unavailable (build failed or no compiler; torch path in use)"
        else:
            out[name] = "in use" if usable(name) else "built without the CPU features it needs (torch path in use)"
    return out
