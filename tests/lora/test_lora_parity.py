"""Logits with a PEFT adapter (LoRA, rsLoRA, DoRA) against transformers + peft on the same weights, fp32."""

from __future__ import annotations

import pytest
import torch
from peft_adapters import VARIANTS, make_adapter, peft_logits

from frugallm import LLM
from frugallm.lora import LoraManager
from frugallm.lora.layer import LoraLinear
from frugallm.quant.gguf_linear import GGUFLinear

pytest.importorskip("peft")
ATOL = 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases (DoRA rescales around them)
def test_variants_match_peft(tiny_models, tiny_ids, tmp_path, arch: str) -> None:
    ref = tiny_models.hf_reference(arch)
    paths = {name: make_adapter(ref, tmp_path / name, seed=i, **kw) for i, (name, kw) in enumerate(VARIANTS.items())}
    llm = LLM(tiny_models.hf(arch), dtype="float32", device="cpu", lora=paths, max_lora_rank=8)
    base = llm.score(tiny_ids)
    torch.testing.assert_close(base, tiny_models.reference_logits(tiny_models.hf(arch), ref, tiny_ids),
                               atol=ATOL, rtol=0)
    for name, path in paths.items():
        got, want = llm.score(tiny_ids, lora=name), peft_logits(ref, path, tiny_ids)
        assert (got - base).abs().max() > 1e-2, f"{name} changed nothing"
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(llm.score(tiny_ids), base, atol=0, rtol=0)  # no adapter: the base model again


def test_stored_gguf_base_is_not_merged(tiny_models, tiny_ids, tmp_path) -> None:
    """On a GGUF run as stored the adapter runs beside the GGUF kernel; logits match peft on the dequantized
    weights (fp32 activations), and bf16 activations (this CPU's default) stay close."""
    ref = tiny_models.gguf_reference("llama", "Q8_0")
    path = make_adapter(ref, tmp_path / "dora", seed=3, **VARIANTS["dora"])
    llm = LLM(tiny_models.gguf("llama", "Q8_0"), device="cpu", weights="stored")
    llm.model.prefill_dtype = llm.model.decode_dtype = torch.float32
    llm.lora = LoraManager(llm.model, llm.config, max_loras=2, max_lora_rank=4, dtype=torch.float32)
    llm.lora.add("dora", path)
    qkv = llm.model.layers[0].attn.qkv_proj
    assert isinstance(qkv, LoraLinear) and isinstance(qkv.base, GGUFLinear)
    raw = qkv.base.raw(0).clone()
    want = peft_logits(ref, path, tiny_ids)
    torch.testing.assert_close(llm.score(tiny_ids, lora="dora"), want, atol=ATOL, rtol=0)
    assert torch.equal(qkv.base.raw(0), raw)  # the stored blocks are untouched
    # Decode steps (one token, the native GGUF kernel through the decode plan) against the same reference.
    out = llm.generate(tiny_ids[:6], _greedy(4), lora="dora")[0]
    peft_next = peft_logits(ref, path, tiny_ids[:6] + out.token_ids[:-1]).argmax(-1)[5:].tolist()
    assert out.token_ids == peft_next


def _greedy(n: int):
    from frugallm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
