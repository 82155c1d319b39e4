"""``frugallm quantize`` output is replaced whole or not at all (issue 16 #11): the new folder is assembled beside
the target and renamed into place, so an interrupted ``--force`` keeps the previous good output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import safetensors.torch

from frugallm import LLM
from frugallm.cli import main
from frugallm.quant import int8
from frugallm.tokenizer.tokenizer import Tokenizer

IDS = list(range(5, 30))


@pytest.fixture(autouse=True)
def _no_int8_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "INT8_KERNEL_MAX_ROWS", {"cpu": 0, "cuda": 0})  # as test_quant_storage.py


@pytest.fixture(scope="module")
def gguf(tiny_models) -> Path:
    return tiny_models.gguf("llama", "F32")


def quantize(gguf: Path, out: Path, spec: str, *extra: str) -> int:
    return main(["quantize", str(gguf), "--quant", spec, "-o", str(out), "--no-cache", *extra])


def snapshot(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def interrupt_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    real = safetensors.torch.save_file

    def half_then_interrupt(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])  # as if killed mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_interrupt)


def interrupt_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Tokenizer) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "to_dict", interrupted)  # after the weights, before the metadata


@pytest.mark.parametrize("interrupt", [interrupt_weights, interrupt_metadata])
def test_interrupted_force_keeps_the_previous_output(gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     interrupt) -> None:
    out = tmp_path / "q"
    assert quantize(gguf, out, "int8") == 0
    before = snapshot(out)
    ref = LLM(str(out), dtype="float32", device="cpu").score(IDS)
    with monkeypatch.context() as mp:
        interrupt(mp)
        assert quantize(gguf, out, "int4:group=32", "--force") == 130  # the CLI's answer to Ctrl-C
    assert snapshot(out) == before  # the int8 output, byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # the partial folder was removed
    got = LLM(str(out), dtype="float32", device="cpu").score(IDS)
    assert (got == ref).all()


def test_force_replaces_the_whole_folder(gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    assert quantize(gguf, out, "int8") == 0
    int8_files = snapshot(out)
    assert quantize(gguf, out, "int4:group=32", "--force") == 0
    assert snapshot(out) != int8_files and '"bits": 4' in (out / "frugallm_quant.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # nothing left beside it
    assert LLM(str(out), dtype="float32", device="cpu").score(IDS).shape[0] == len(IDS)


def test_force_never_replaces_a_folder_of_other_files(gguf: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    assert quantize(gguf, out, "int8", "--force") == 2
    assert "not a quantized folder" in capsys.readouterr().err
    assert (out / "thesis.txt").read_text() == "years of work"


def test_output_under_a_file_fails_before_quantizing(gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import frugallm.quant.commands as qc

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("quantized before checking the output")

    monkeypatch.setattr(qc, "LLM", no_load)
    (tmp_path / "file").write_text("x")
    assert quantize(gguf, tmp_path / "file" / "out", "int8") == 2
    assert "is not a folder" in capsys.readouterr().err
