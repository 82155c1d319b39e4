"""Whole-model swapping: ``quantize_model`` on a tiny stand-in model (tied and untied head, embedding and
head flags, bf16)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from frugallm.errors import FrugalError
from frugallm.quant import (
    GroupQuantLinear,
    Int8Linear,
    LLMInt8Linear,
    Mix4Linear,
    QuantEmbedding,
    quantize_model,
    quantized_weight_bytes,
)
from quant_models import IDS, TinyLM, rel_err, tiny_lm_pair


@pytest.fixture(scope="module")
def tiny_models() -> dict[bool, TinyLM]:
    return tiny_lm_pair()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    "spec,linear_cls,bound",
    [
        ("int8", Int8Linear, 0.01),
        ("llm.int8", LLMInt8Linear, 0.02),
        ("int4:group=32", GroupQuantLinear, 0.06),
        ("int3:group=32", GroupQuantLinear, 0.12),
        ("auto4", GroupQuantLinear, 0.08),
        ("mix4:group=32", Mix4Linear, 0.06),
    ],
)
def test_quantize_model_swaps_linears(tiny_models: dict, tied: bool, spec: str, linear_cls: type, bound: float):
    base = tiny_models[tied]
    model = copy.deepcopy(base)
    with torch.no_grad():
        ref = base(IDS)
        assert quantize_model(model, spec) is model
        out = model(IDS)
    for block in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            assert isinstance(getattr(block, name), linear_cls), name
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding  # no flags
    assert rel_err(out, ref) < bound
    assert quantized_weight_bytes(model) < quantized_weight_bytes(base)


@pytest.mark.parametrize("flags", [":embed", ":head", ":embed:head"])
def test_tied_head_shares_quantized_embedding(tiny_models: dict, flags: str) -> None:
    base = tiny_models[True]
    model = quantize_model(copy.deepcopy(base), "int4:group=32" + flags)
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert model.lm_head is model.embed_tokens.table  # one quantized copy serves both
    table = model.embed_tokens.table
    assert table.layout == "int4_cpu"  # 256 rows: the head gets the packed kernel
    with torch.no_grad():
        assert rel_err(model(IDS), base(IDS)) < 0.12
        rows = model.embed_tokens(IDS)
    assert rows.shape == (2, 9, 128) and rows.dtype == torch.float32
    assert torch.allclose(rows, table.dequantize()[IDS], atol=1e-6)
    # 4.5 bits per weight instead of 32 for the shared matrix, counted once
    fp = quantized_weight_bytes(base)
    shared_fp = 256 * 128 * 4
    assert quantized_weight_bytes(model) < fp - shared_fp + 0.2 * shared_fp


def test_untied_head_and_embedding_flags(tiny_models: dict) -> None:
    base = tiny_models[False]
    head_only = quantize_model(copy.deepcopy(base), "int8:head")
    assert isinstance(head_only.lm_head, Int8Linear) and isinstance(head_only.embed_tokens, nn.Embedding)
    embed_only = quantize_model(copy.deepcopy(base), "int8:embed")
    assert isinstance(embed_only.embed_tokens, QuantEmbedding) and type(embed_only.lm_head) is nn.Linear
    assert isinstance(embed_only.embed_tokens.table, Int8Linear)  # int8 specs store int8 embedding rows
    with torch.no_grad():
        assert rel_err(embed_only(IDS), base(IDS)) < 0.01
        assert rel_err(head_only(IDS), base(IDS)) < 0.01


@pytest.mark.parametrize("tied", [True, False])
def test_head_bits_int8_table_with_int4_layers(tiny_models: dict, tied: bool) -> None:
    """``head=8``: int4 layers with an int8 head, as llama.cpp keeps Q8_0 ``token_embd`` in Q4 files."""
    base = tiny_models[tied]
    model = quantize_model(copy.deepcopy(base), "int4:group=32:head=8")
    assert isinstance(model.layers[0].down_proj, GroupQuantLinear)
    assert isinstance(model.lm_head, Int8Linear)
    if tied:
        assert isinstance(model.embed_tokens, QuantEmbedding) and model.lm_head is model.embed_tokens.table
    else:
        assert type(model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        int4_only = quantize_model(copy.deepcopy(base), "int4:group=32")
        # the head adds int8 error only: close to the int4-layers-only model
        assert rel_err(model(IDS), int4_only(IDS)) < 0.02
        assert rel_err(model(IDS), base(IDS)) < 0.12


def test_bf16_model(tiny_models: dict) -> None:
    base = copy.deepcopy(tiny_models[True]).to(torch.bfloat16)
    model = quantize_model(copy.deepcopy(base), "int4:group=32:embed")
    with torch.no_grad():
        out = model(IDS)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, base(IDS)) < 0.12


def test_gptq_requires_calibration(tiny_models: dict) -> None:
    with pytest.raises(FrugalError, match="needs calibration"):
        quantize_model(copy.deepcopy(tiny_models[True]), "gptq:bits=4:group=32")
