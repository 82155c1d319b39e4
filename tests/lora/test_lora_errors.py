"""Bad adapters and bad requests: one clear error naming the problem."""

from __future__ import annotations

import json

import pytest
from peft_adapters import make_adapter

from frugallm import LLM
from frugallm.errors import FrugalError, InvalidRequestError

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models.hf("llama"), dtype="float32", device="cpu", max_loras=2, max_lora_rank=4)


@pytest.fixture(scope="module")
def good(tiny_models, tmp_path_factory):
    return make_adapter(tiny_models.hf_reference("llama"), tmp_path_factory.mktemp("good") / "a", seed=1, r=4,
                        lora_alpha=4, target_modules=["q_proj", "v_proj"])


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_shape_mismatch(llm, tiny_models, tmp_path) -> None:
    other = tiny_models.hf_reference("llama", hidden_size=96)
    path = make_adapter(other, tmp_path / "big", seed=0, r=2, target_modules=["q_proj"])
    with pytest.raises(FrugalError, match=r"layers\.0\.q_proj: adapter shape .* does not match the base model"):
        llm.lora.add("big", path)


def test_target_module_mismatch(llm, tiny_models, tmp_path) -> None:
    path = make_adapter(tiny_models.hf_reference("llama"), tmp_path / "head", seed=0, r=2, target_modules=["lm_head"])
    with pytest.raises(FrugalError, match=r"tensor 'base_model\.model\.lm_head\..*' targets a module frugallm cannot"):
        llm.lora.add("head", path)


def test_unsupported_variant_and_options(llm, good, tmp_path) -> None:
    with pytest.raises(FrugalError, match="unsupported PEFT variant 'LOHA'"):
        llm.lora.add("x", _edit_config(good, tmp_path / "loha", peft_type="LOHA"))
    with pytest.raises(FrugalError, match="unsupported LoRA option fan_in_fan_out"):
        llm.lora.add("x", _edit_config(good, tmp_path / "fifo", fan_in_fan_out=True))
    with pytest.raises(FrugalError, match="no adapter_config.json"):
        llm.lora.add("x", tmp_path)


def test_rank_above_max_and_unknown_name(llm, tiny_models, good, tmp_path) -> None:
    path = make_adapter(tiny_models.hf_reference("llama"), tmp_path / "r8", seed=0, r=8, target_modules=["q_proj"])
    with pytest.raises(FrugalError, match="rank 8, above max_lora_rank 4"):
        llm.lora.add("r8", path)
    llm.lora.add("good", good)
    with pytest.raises(FrugalError, match="already loaded"):
        llm.lora.add("good", good)
    with pytest.raises(InvalidRequestError, match=r"unknown LoRA adapter 'nope' \(loaded adapters: good\)"):
        llm.generate("hi", lora="nope")
    assert llm.lora.remove("good").name == "good"
    with pytest.raises(InvalidRequestError, match="unknown LoRA adapter 'good'"):
        llm.score([1, 2, 3], lora="good")
    with pytest.raises(FrugalError, match="max_lora_rank must be an integer in"):
        LLM(tiny_models.hf("llama"), dtype="float32", device="cpu", max_loras=1, max_lora_rank=65)
