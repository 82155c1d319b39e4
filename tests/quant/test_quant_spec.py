"""Weight quantization formats: bit packing, quant spec parsing and the methods registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from frugallm.errors import FrugalError
from frugallm.quant import QUANT_METHODS, QuantSpec, parse_quant_spec
from frugallm.quant.packing import SUPPORTED_BITS, chunk_shape, pack, packed_size, unpack

# ------------------------------------------------------------------------------------------------ packing


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    rows=st.integers(1, 4),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_pack_roundtrip(bits: int, rows: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits,values,nbytes", [(2, 4, 1), (3, 8, 3), (4, 2, 1), (6, 4, 3), (8, 1, 1)])
def test_pack_is_dense(bits: int, values: int, nbytes: int) -> None:
    assert chunk_shape(bits) == (values, nbytes)
    codes = torch.randint(0, 2**bits, (5, 96), dtype=torch.uint8)
    assert pack(codes, bits).numel() == 5 * 96 * bits // 8


def test_pack_rejects_bad_width_and_size() -> None:
    with pytest.raises(FrugalError, match="5-bit"):
        pack(torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(FrugalError, match="does not hold"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 8)


# --------------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    "text,expected",
    [
        ("int8", QuantSpec("int8", 8)),
        ("llm.int8", QuantSpec("llm.int8", 8)),
        ("llm.int8:threshold=5", QuantSpec("llm.int8", 8, threshold=5.0)),
        ("int4:group=32", QuantSpec("int", 4, 32)),
        ("int3:group=64:sym", QuantSpec("int", 3, 64, symmetric=True)),
        ("int6", QuantSpec("int", 6, 64)),
        ("int2:group=32", QuantSpec("int", 2, 32)),
        ("int8:group=128", QuantSpec("int", 8, 128)),
        ("gptq:bits=4:group=128", QuantSpec("gptq", 4, 128)),
        ("gptq:bits=4:group=128:act_order", QuantSpec("gptq", 4, 128, act_order=True)),
        ("gptq", QuantSpec("gptq", 4, 64)),
        ("auto4", QuantSpec("auto4", 4)),
        ("auto4:tol=0.05", QuantSpec("auto4", 4, tol=0.05)),
        ("mix4", QuantSpec("mix4", 4, 64)),
        ("int4:group=32:embed:head", QuantSpec("int", 4, 32, include_embeddings=True, include_lm_head=True)),
        (" INT8:head ", QuantSpec("int8", 8, include_lm_head=True)),
        ("int4:group=32:head=8", QuantSpec("int", 4, 32, include_lm_head=True, embed_bits=8)),
        ("llm.int8:threshold=2:zeropoint", QuantSpec("llm.int8", 8, threshold=2.0, zeropoint=True)),
        ("int4:group=32:embed=8:head=8",
         QuantSpec("int", 4, 32, include_embeddings=True, include_lm_head=True, embed_bits=8)),
    ],
)
def test_parse_valid(text: str, expected: QuantSpec) -> None:
    spec = parse_quant_spec(text)
    assert spec == expected
    assert parse_quant_spec(str(spec)) == spec  # str() is a canonical, re-parsable form


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "empty"),
        ("int5", "int5 is not supported"),
        ("fp8", "unknown quantization method 'fp8'.*valid: int2, int3"),
        ("int4:group=48", "group size 48 is not supported.*32, 64, 128"),
        ("int4:grp=32", "unknown option 'grp'.*valid options: group, sym, asym, bits, embed, head"),
        ("llm.int8:group=32", "unknown option 'group'.*threshold"),
        ("gptq:bits=5", "gptq does not support 5 bits"),
        ("int4:group=abc", "not a valid int"),
        ("int4:sym=1", "must be written as 'sym'"),
        ("int4:group", "must be written as 'group=VALUE'"),
        ("int4:group=32:group=64", "given twice"),
        ("int4:sym:asym", "both sym and asym"),
        ("llm.int8:threshold=-1", "threshold must be > 0"),
        ("int4:bits=3", "already fixes the bit width"),
        ("auto4:tol=2", "tol must be in"),
        ("int4:group=32:head=3", "tables support bits"),
        ("int4:group=32:embed=4:head=8", "different bit widths"),
        ("int4:group=32:head=x", "not a valid int"),
        ("int4:zeropoint", "unknown option 'zeropoint'"),
    ],
)
def test_parse_invalid(text: str, match: str) -> None:
    with pytest.raises(FrugalError, match=match):
        parse_quant_spec(text)


def test_spec_validates_on_construction() -> None:
    with pytest.raises(FrugalError, match="act_order only applies to gptq"):
        QuantSpec("int", 4, 32, act_order=True)
    with pytest.raises(FrugalError, match="needs a group size"):
        QuantSpec("int", 4)


def test_registry_names_and_error() -> None:
    assert QUANT_METHODS.names() == sorted(["int8", "llm.int8", "int", "gptq", "auto4", "mix4"])
    with pytest.raises(FrugalError, match="valid choices: auto4, gptq, int, int8"):
        QUANT_METHODS.get("nf4")
