"""Every native kernel this CPU can run builds: a build failure is a failure here, not ~30 skips elsewhere.

Without a C++ compiler the kernels' tests skip (the torch paths run); under CI (``CI=true``) a missing
compiler fails too, since CI machines are set up to build them.
"""

from __future__ import annotations

import os

import pytest

from frugallm import cpu, native

KERNELS = sorted(p.stem for p in native.CSRC.glob("*.cpp"))


@pytest.mark.isa
@pytest.mark.parametrize("name", [k for k in KERNELS if native.runnable(k)])
def test_runnable_kernel_builds(name: str) -> None:
    if not native.enabled():
        pytest.skip("FRUGALLM_NATIVE=0")
    if native._compiler() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no C++ compiler on a CI machine: native kernels cannot be built or tested")
        pytest.skip("no C++ compiler (torch paths in use)")
    assert native.load(name), f"csrc/{name}.cpp failed to build at ISA level {cpu.level()} (see the log warning)"


def test_kernels_declare_a_known_level() -> None:
    assert {native.required_level(k) for k in KERNELS} <= set(cpu.LEVELS)
