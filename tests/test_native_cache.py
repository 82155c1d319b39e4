"""Native libraries are loaded only from folders no one else can write (issue 16 #7).

A library's constructor runs when it is loaded: one planted in a shared cache folder must never be loaded, and
building must never delete other users' files. The end-to-end tests build with a stand-in compiler (a script that
copies a prebuilt library whose constructor leaves a marker file), so no kernel is compiled.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from frugallm import cpu, native

KERNEL = next(k for k in sorted(p.stem for p in native.CSRC.glob("*.cpp")) if native.runnable(k))
CC = shutil.which("cc") or shutil.which("gcc")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FRUGALLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_private_dirs", {})
    return tmp_path / "cache"


def test_private_cache_folder_is_used(cache: Path) -> None:
    d = native.native_dir()
    assert d == cache / "native" and (d.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_writable_by_others_falls_back_to_a_private_folder(cache: Path, mode: int,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    (cache / "native").mkdir(parents=True)
    (cache / "native").chmod(mode)
    with caplog.at_level(logging.WARNING, logger="frugallm.native"):
        d, again = native.native_dir(), native.native_dir()
    assert d == again and d.parent != cache and (d.stat().st_mode & 0o777) == 0o700 and d.stat().st_uid == os.getuid()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "writable by other users" in warnings[0] and str(d) in warnings[0]


def test_owned_by_another_user_falls_back(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    (cache / "native").mkdir(parents=True, mode=0o700)
    real = os.getuid()
    monkeypatch.setattr(native.os, "getuid", lambda: real + 1)  # the folder now belongs to "someone else"
    with caplog.at_level(logging.WARNING, logger="frugallm.native"):
        d = native.native_dir()
    assert d.parent != cache and "owned by uid" in caplog.text


def test_group_writable_parent_falls_back(cache: Path) -> None:
    cache.mkdir(parents=True)
    cache.chmod(0o775)  # someone in the group could rename native/ and put their own in its place
    assert native.native_dir().parent != cache


@pytest.fixture(scope="module")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``planted.so`` / ``ours.so`` (constructors that touch ``$MARKER_DIR/planted`` / ``ours``) and a stand-in
    compiler that 'builds' by copying ``ours.so``."""
    if CC is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("libs")
    out = {}
    for who in ("planted", "ours"):
        src = d / f"{who}.c"
        src.write_text('#include <stdio.h>\n#include <stdlib.h>\n'
                       '__attribute__((constructor)) static void mark(void) {\n'
                       f'  char p[4096]; snprintf(p, sizeof p, "%s/{who}", getenv("MARKER_DIR"));\n'
                       '  FILE *f = fopen(p, "w"); if (f) fclose(f);\n}\n')
        subprocess.run([CC, "-shared", "-fPIC", str(src), "-o", str(d / f"{who}.so")], check=True)
        out[who] = d / f"{who}.so"
    fake = d / "fakecxx"
    fake.write_text('#!/bin/sh\n[ "$1" = "--version" ] && { echo "fakecxx 1.0"; exit 0; }\n'
                    'while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n'
                    f'cp "{out["ours"]}" "$out"\n')
    fake.chmod(0o755)
    out["cxx"] = fake
    return out


def run_load(cache: Path, libs: dict[str, Path], markers: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FRUGALLM_CACHE_DIR": str(cache), "CXX": str(libs["cxx"]), "MARKER_DIR": str(markers)}
    code = f"from frugallm import native; assert native.load({KERNEL!r}); print(native._build_path({KERNEL!r}, " \
           f"{str(libs['cxx'])!r})[0])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def planted_name(cache: Path, libs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CXX", str(libs["cxx"]))
    return native._build_path(KERNEL, str(libs["cxx"]))[0].name  # the name a build for this machine gets


@pytest.mark.parametrize("where", ["shared-folder", "writable-file"])
def test_planted_library_is_never_loaded(cache: Path, libs: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    name = planted_name(cache, libs, monkeypatch)
    folder = cache / "native"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(libs["planted"], folder / name)
    if where == "shared-folder":
        folder.chmod(0o777)
    else:
        folder.chmod(0o700)
        (folder / name).chmod(0o666)
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = run_load(cache, libs, markers)
    assert proc.returncode == 0, proc.stderr
    assert not (markers / "planted").exists(), "the planted library's constructor ran"
    assert (markers / "ours").exists()  # our own build was loaded instead
    loaded_from = Path(proc.stdout.strip())
    if where == "shared-folder":
        assert loaded_from.parent != folder and "not using the cache folder" in proc.stderr
        assert (folder / name).exists()  # left alone: the shared folder is not ours to clean
    else:
        assert loaded_from == folder / name and (loaded_from.stat().st_mode & 0o022) == 0  # rebuilt in place


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="giving a file to another user needs root")
def test_stale_builds_of_other_users_are_kept(cache: Path) -> None:
    folder = native.native_dir()
    out = folder / f"{KERNEL}-{cpu.level()}-new.so"
    mine, theirs = folder / f"{KERNEL}-{cpu.level()}-old1.so", folder / f"{KERNEL}-{cpu.level()}-old2.so"
    for f in (out, mine, theirs):
        f.write_bytes(b"\0")
    os.chown(theirs, 4242, 4242)
    native._remove_stale(out, KERNEL)
    assert out.exists() and not mine.exists() and theirs.exists()
