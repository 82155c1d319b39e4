"""glibc malloc tuning (``engine/allocator.py``): applied once, skipped when switched off."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = "import frugallm.engine.allocator as a; print(a.tune_malloc(), a.tune_malloc())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_malloc_applies_once_and_can_be_switched_off() -> None:
    on = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"]
    env = {"FRUGALLM_NO_MALLOPT": "1", "PATH": ""}
    off = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env=env)
    assert off.stdout.split() == ["False", "False"]
