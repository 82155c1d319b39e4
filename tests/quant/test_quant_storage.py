"""Quantized folders (``frugallm quantize``): round trips, packed loading, byte counts, corrupted folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from frugallm import LLM
from frugallm.errors import FrugalError
from frugallm.loading.quantized import load_quantized
from frugallm.quant import GroupQuantLinear, Int8Linear, LLMInt8Linear, Mix4Linear, QuantEmbedding, int8
from frugallm.quant.storage import META_FILE, WEIGHTS_FILE, save_quantized, theoretical_weight_bytes

IDS = list(range(5, 30))
SPECS = {
    "int8": Int8Linear,
    "llm.int8": LLMInt8Linear,
    "llm.int8:threshold=2:zeropoint": LLMInt8Linear,
    "int4:group=32": GroupQuantLinear,
    "int3:group=32": GroupQuantLinear,
    "mix4:group=32": Mix4Linear,
    "gptq:bits=4:group=32": GroupQuantLinear,
    "int4:group=32:embed:head": GroupQuantLinear,
    "int4:group=32:head=8": GroupQuantLinear,
}


@pytest.fixture(autouse=True)
def _no_int8_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch._weight_int8pack_mm intermittently segfaults on the tiny model's shapes (reported separately);
    # these tests are about storage, so int8 runs through its dequantize-then-matmul path.
    monkeypatch.setattr(int8, "INT8_KERNEL_MAX_ROWS", {"cpu": 0, "cuda": 0})


@pytest.fixture(scope="module")
def gguf(tiny_models) -> Path:
    return tiny_models.gguf("llama", "F32")


@pytest.fixture(scope="module")
def saved(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.Tensor, int]]:
    """spec -> (folder, logits of the in-memory quantized model, its weight bytes)."""
    root = tmp_path_factory.mktemp("quant-folders")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8, "INT8_KERNEL_MAX_ROWS", {"cpu": 0, "cuda": 0})
        for spec in SPECS:
            llm = LLM(str(gguf), dtype="float32", device="cpu", quant=spec, use_cache=False)
            folder = root / spec.replace(":", "_")
            save_quantized(llm.model, folder, spec=llm.quant_spec, config=llm.config, tokenizer=llm.tokenizer,
                           source=gguf, source_sha256="0" * 64)
            out[spec] = (folder, llm.score(IDS), llm.weight_bytes())
    return out


@pytest.mark.parametrize("spec", list(SPECS))
def test_round_trip_logits_and_bytes(saved: dict, spec: str) -> None:
    folder, ref_logits, ref_bytes = saved[spec]
    llm = LLM(str(folder), dtype="float32", device="cpu")
    assert any(isinstance(m, SPECS[spec]) for m in llm.model.modules())
    assert not any(type(m) is nn.Linear for m in llm.model.layers.modules()), "a block linear is not quantized"
    torch.testing.assert_close(llm.score(IDS), ref_logits, rtol=0, atol=0)
    assert llm.weight_bytes() == ref_bytes
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["weight_bytes"] == pytest.approx(meta["theoretical_bytes"], rel=0.05)
    assert llm.weight_bytes() == pytest.approx(theoretical_weight_bytes(llm.model), rel=0.05)
    assert (folder / WEIGHTS_FILE).stat().st_size == pytest.approx(meta["theoretical_bytes"], rel=0.05)
    assert meta["method"] and meta["bits"] and meta["source_sha256"] == "0" * 64
    assert llm.loaded.source_info["quant_spec"] == meta["spec"]


def test_tied_head_shares_storage(saved: dict) -> None:
    llm = LLM(str(saved["int4:group=32:embed:head"][0]), dtype="float32", device="cpu")
    assert isinstance(llm.model.embed_tokens, QuantEmbedding)
    if llm.config.tie_word_embeddings:
        assert llm.model.lm_head is llm.model.embed_tokens.table


def test_loading_never_creates_full_precision_weights(saved: dict) -> None:
    """Every tensor created while loading is recorded: none is a float matrix of a quantized linear's shape."""
    from torch.utils._python_dispatch import TorchDispatchMode

    folder = saved["int4:group=32"][0]
    created: list[tuple[tuple[int, ...], torch.dtype, str]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    created.append((tuple(t.shape), t.dtype, t.device.type))
            return out

    with Record():
        loaded = load_quantized(folder, torch.float32, torch.device("cpu"))
    shapes = {(m.out_features, m.in_features) for m in loaded.model.modules() if isinstance(m, GroupQuantLinear)}
    assert shapes
    bad = [c for c in created if c[2] != "meta" and c[1].is_floating_point and c[0] in shapes]
    assert not bad, f"full-precision weight materialized: {bad[:3]}"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "q"
    shutil.copytree(src, dst)
    return dst


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_corrupted_folders(saved: dict, tmp_path: Path) -> None:
    src = saved["int4:group=32"][0]
    cases = []

    def missing_weights(d: Path) -> None:
        (d / WEIGHTS_FILE).unlink()

    def truncated(d: Path) -> None:
        data = (d / WEIGHTS_FILE).read_bytes()
        (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])

    def garbage_meta(d: Path) -> None:
        (d / META_FILE).write_text("{not json")

    def unknown_method(d: Path) -> None:
        _edit_meta(d, lambda m: m.update(spec="int5:group=32"))

    def unknown_class(d: Path) -> None:
        _edit_meta(d, lambda m: m["modules"][0].update({"class": "Int7Linear"}))

    def wrong_shape(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] *= 2
        (d / "config.json").write_text(json.dumps(cfg))

    def wrong_module(d: Path) -> None:
        _edit_meta(d, lambda m: m["modules"][0].update(path="layers.0.attn.nope"))

    def tensor_mismatch(d: Path) -> None:
        _edit_meta(d, lambda m: m["modules"][0]["buffers"]["qweight"].update(shape=[1, 2]))

    cases = [
        (missing_weights, "missing model.safetensors"),
        (truncated, "corrupt or truncated"),
        (garbage_meta, "frugallm_quant.json is corrupt"),
        (unknown_method, "int5"),
        (unknown_class, "unknown quantized module type 'Int7Linear'"),
        (wrong_shape, "does not match"),
        (wrong_module, "layers.0.attn.nope"),
        (tensor_mismatch, "the metadata says"),
    ]
    for i, (corrupt, message) in enumerate(cases):
        d = _copy(src, tmp_path / str(i))
        corrupt(d)
        with pytest.raises(FrugalError, match=message):
            LLM(str(d), dtype="float32", device="cpu")


def test_cli_quantize_writes_a_loadable_folder(gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from frugallm.cli import main

    out = tmp_path / "cli"
    assert main(["quantize", str(gguf), "--quant", "int4:group=32", "-o", str(out), "--no-cache", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "int" and summary["bits"] == 4 and summary["group_size"] == 32
    assert len(summary["source_sha256"]) == 64
    assert summary["weight_bytes"] == pytest.approx(summary["theoretical_bytes"], rel=0.05)
    llm = LLM(str(out), dtype="float32", device="cpu")
    assert llm.score(IDS).shape[0] == len(IDS)
    # a non-empty output folder is refused, and a bad spec fails before loading
    assert main(["quantize", str(gguf), "--quant", "int4:group=32", "-o", str(out)]) == 2
    assert main(["quantize", str(gguf), "--quant", "int5", "-o", str(tmp_path / "x")]) == 2
    assert "int5" in capsys.readouterr().err
