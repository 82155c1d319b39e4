"""Hardware probe: quick-mode measurements, the JSON cache, system-info parsing."""

from __future__ import annotations

import json

import pytest
import torch

from frugallm.errors import FrugalError
from frugallm.lab import hwmeasure, hwprobe
from frugallm.lab.hwspecs import load_hw_spec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FRUGALLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_quick_probe_measures_and_caches(cache, monkeypatch) -> None:
    monkeypatch.setattr(hwprobe, "loadavg_1m", lambda: 0.0)  # a quiet machine: the cache is served as is
    spec = hwprobe.probe("cpu", quick=True)
    assert spec.source == "probed"
    assert spec.mem_bandwidth_gbs > 0
    assert spec.peak_flops["fp32"] > 0
    assert spec.gemv_bandwidth_gbs and spec.gemv_bandwidth_gbs["fp32"] > 0
    assert all(v > 0 for v in spec.gemv_bandwidth_gbs.values())
    assert spec.mem_bytes and spec.mem_bytes > 0
    path = hwprobe.cache_path("cpu", quick=True)
    assert path.parent == cache and path.is_file()
    assert f"t{torch.get_num_threads()}" in path.name

    first = hwprobe.probe_result("cpu", quick=True)
    assert first.measurements["copy_bw"].value > 0
    assert len(first.measurements["read_bw"].samples) == 2
    assert first.torch_version == torch.__version__ and first.quick
    for dtype in ("bf16", "fp16", "int8"):  # each either measured or skipped with a reason
        key = f"matmul_{dtype}"
        assert (key in first.measurements) != bool(first.skipped.get(key))

    def no_measure(*args, **kwargs):
        raise AssertionError("should have been served from the cache")

    monkeypatch.setattr(hwprobe, "measure", no_measure)
    again = hwprobe.probe_result("cpu", quick=True)
    assert again == first  # reloaded from JSON, identical
    monkeypatch.undo()
    monkeypatch.setenv("FRUGALLM_CACHE_DIR", str(cache))
    monkeypatch.setattr(hwprobe, "loadavg_1m", lambda: 0.0)
    fresh = hwprobe.probe_result("cpu", refresh=True, quick=True)
    assert fresh.timestamp > first.timestamp


def test_corrupt_cache_is_remeasured(cache) -> None:
    path = hwprobe.cache_path("cpu", quick=True)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert hwprobe.probe("cpu", quick=True).mem_bandwidth_gbs > 0


def test_load_hw_spec_local_uses_probe(cache, monkeypatch) -> None:
    real = hwprobe.measure
    monkeypatch.setattr(hwprobe, "measure", lambda device="cpu", quick=False: real(device, quick=True))
    monkeypatch.setattr(hwprobe, "default_device", lambda: "cpu")
    spec = load_hw_spec("local")
    assert spec.source == "probed" and spec.name.startswith("local cpu")
    assert hwprobe.cache_path("cpu").is_file()
    assert load_hw_spec("auto") == spec


def test_old_cache_version_is_remeasured(cache) -> None:
    first = hwprobe.probe_result("cpu", quick=True)
    path = hwprobe.cache_path("cpu", quick=True)
    old = json.loads(path.read_text())
    old["version"] = 1
    old["spec"].pop("gemv_bandwidth_gbs")
    path.write_text(json.dumps(old))
    again = hwprobe.probe_result("cpu", quick=True)
    assert again.timestamp > first.timestamp and again.spec.gemv_bandwidth_gbs


def test_bad_devices() -> None:
    with pytest.raises(FrugalError, match="invalid device"):
        hwprobe.probe("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(FrugalError, match="CUDA is not available"):
            hwprobe.probe("cuda")


def test_cache_sizes_parse_sysfs(tmp_path) -> None:
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                             (2, "Unified", "1024K"), (3, "Unified", "32M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert hwmeasure.cache_sizes(tmp_path) == {"L1d": 48 << 10, "L1i": 32 << 10, "L2": 1 << 20, "L3": 32 << 20}
    assert hwmeasure.cache_sizes(tmp_path / "missing") == {}


def test_quick_probe_command_never_compiles_native_kernels(cache, monkeypatch, capsys) -> None:
    """``hw probe --quick`` is the fast smoke test: it must not spend minutes compiling csrc/."""
    from frugallm import native
    from frugallm.cli import main

    def no_build(name: str, cxx: str) -> None:
        raise AssertionError(f"hw probe --quick compiled native kernel {name}")

    already = set(native._loaded)  # loaded by earlier tests in this process: loading those again is free
    loads: list[str] = []
    real_load = native.load
    monkeypatch.setattr(native, "_build", no_build)
    monkeypatch.setattr(native, "load", lambda name: loads.append(name) or real_load(name))
    monkeypatch.setattr(hwprobe, "default_device", lambda: "cpu")
    assert main(["hw", "probe", "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quick"] and out["native_kernels"]
    assert set(loads) <= already


def test_probe_records_its_load_and_a_busy_probe_is_flagged_then_refreshed(cache, monkeypatch) -> None:
    import psutil

    cores = psutil.cpu_count(logical=True) or 1
    monkeypatch.setattr(hwprobe, "loadavg_1m", lambda: float(cores))  # busy: load = the core count
    busy = hwprobe.probe_result("cpu", quick=True)
    assert busy.loadavg_1m == cores and busy.busy and busy.age_s < 60
    assert any("busy machine" in n and "--refresh" in n for n in busy.notes())
    assert hwprobe.probe_result("cpu", quick=True) == busy  # still busy: the cached probe, flagged
    monkeypatch.setattr(hwprobe, "loadavg_1m", lambda: 0.0)  # quiet now: measured again
    quiet = hwprobe.probe_result("cpu", quick=True)
    assert quiet.timestamp > busy.timestamp and quiet.busy is False
    assert not any("busy" in n for n in quiet.notes())
    assert hwprobe.probe_result("cpu", quick=True) == quiet  # and kept
    old = hwprobe.ProbeResult.from_dict({**quiet.to_dict(), "timestamp": quiet.timestamp - 40 * 86400,
                                         "loadavg_1m": None})
    assert old.busy is None and any("days old" in n for n in old.notes())
    assert any("no recorded load average" in n for n in old.notes())
