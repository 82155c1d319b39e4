"""``loading.describe``: one format dispatch for load_model, ``frugallm info`` and the bench's peers;
quantized folders keep a Hugging Face style ``config.json`` that reads back equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from frugallm import LLM
from frugallm.cli import main
from frugallm.config import ModelConfig, RopeScaling
from frugallm.loading import describe, load_model

IDS = list(range(5, 30))


@pytest.fixture(scope="module")
def gguf(tiny_models) -> Path:
    return tiny_models.gguf("llama", "Q8_0")


@pytest.fixture(scope="module")
def quantized(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("describe") / "q"
    assert main(["quantize", str(gguf), "--quant", "int4:group=32", "-o", str(out), "--no-cache"]) == 0
    return out


def test_describe_each_format(tiny_models, gguf: Path, quantized: Path) -> None:
    hf = tiny_models.hf("qwen2", tie_word_embeddings=True)
    for path, fmt in ((gguf, "gguf"), (hf, "hf"), (quantized, "quantized")):
        desc = describe(path, use_cache=False)
        assert desc.format == fmt and desc.path == path
        assert sum(desc.tensor_bytes.values()) > 0
        loaded = load_model(path, torch.float32, torch.device("cpu"), use_cache=False)
        assert loaded.source_format == fmt and loaded.config == desc.config
        assert desc.tokenizer() is desc.tokenizer(), "the tokenizer is built once per description"
        assert desc.tokenizer().encode("hello world") == loaded.tokenizer.encode("hello world")
    assert describe(quantized).source_info["quant_spec"].startswith("int")


def test_describe_gguf_from_weights_cache(gguf: Path) -> None:
    """After one cached conversion, describing the GGUF does not parse it again."""
    load_model(gguf, torch.float32, torch.device("cpu"), use_cache=True)
    cached, parsed = describe(gguf), describe(gguf, use_cache=False)
    assert cached.handle is None and parsed.handle is not None
    assert cached.config == parsed.config and dict(cached.tensor_bytes) == dict(parsed.tensor_bytes)
    assert cached.chat_template == parsed.chat_template
    assert cached.tokenizer().encode("a b c") == parsed.tokenizer().encode("a b c")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_hf_config_round_trip(tiny_models, arch: str) -> None:
    cfg = describe(tiny_models.hf(arch)).config
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    for scaling in (RopeScaling(), RopeScaling(rope_type="linear", factor=2.0)):
        scaled = ModelConfig(**{**cfg.to_dict(), "rope_scaling": scaling})
        assert ModelConfig.from_hf(scaled.to_hf()) == scaled


def test_quantized_folder_has_hf_config(gguf: Path, quantized: Path) -> None:
    hf = json.loads((quantized / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["num_hidden_layers"] > 0 and "tie_word_embeddings" in hf
    assert ModelConfig.from_hf(hf) == describe(gguf, use_cache=False).config


def test_info_on_quantized_folder(quantized: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: ``frugallm info DIR`` on a quantized folder failed with ``unsupported architecture []``."""
    assert main(["info", str(quantized), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["format"] == "quantized" and info["layers"] > 0
    assert info["bytes_per_tensor_type"]["U8"] > 0
    assert main(["info", str(quantized)]) == 0
    assert "llama" in capsys.readouterr().out


def test_previous_format_folder_still_loads(quantized: Path, tmp_path: Path) -> None:
    """Folders written before the HF-style config.json hold ``ModelConfig.to_dict()`` there."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(quantized, old)
    cfg = describe(quantized).config
    (old / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert describe(old).config == cfg
    new, was = (LLM(str(d), dtype="float32", device="cpu") for d in (quantized, old))
    torch.testing.assert_close(was.score(IDS), new.score(IDS), rtol=0, atol=0)


def test_peers_use_describe(quantized: Path) -> None:
    from frugallm.lab.peers.base import load_model_config, load_tokenizer

    desc = describe(quantized)
    assert load_model_config(quantized) == desc.config
    assert load_tokenizer(quantized.resolve()).encode("hi there") == desc.tokenizer().encode("hi there")
