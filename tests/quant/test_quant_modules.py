"""Every runtime quantized module against an fp32 reference, storage sizes, LLM.int8() outliers and the
mix4/auto4 choices (whole-model swapping: test_quant_model.py; GPU: test_quant_cuda.py; GPTQ: test_quant_gptq.py)."""

from __future__ import annotations

import pytest
import torch

from frugallm.errors import FrugalError
from frugallm.quant import GroupQuantLinear, Int8Linear, LLMInt8Linear, Mix4Linear, kernels, parse_quant_spec
from frugallm.quant.groups import GroupQuantState, rtn_group_quantize
from frugallm.quant.mix4 import mix4_quantize
from quant_models import BOUNDS, INPUTS, SHAPES, SPEC_SHAPES, build, gaussian_linear, rel_err

# ------------------------------------------------------------------------------ modules vs fp32 reference


@pytest.mark.parametrize(("spec", "shape"), SPEC_SHAPES)
def test_module_matches_fp32_linear(spec: str, shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    lin = gaussian_linear(out_f, in_f)
    mod = build(spec, lin)
    assert (mod.in_features, mod.out_features) == (in_f, out_f)
    ys, refs = [], []
    for lead in INPUTS:
        x = torch.randn(*lead, in_f)
        with torch.no_grad():
            ref, y = lin(x), mod(x)
        assert y.shape == ref.shape and y.dtype == x.dtype
        assert rel_err(y, ref) < 1.35 * BOUNDS[spec], (spec, shape, lead)
        ys.append(y.reshape(-1))
        refs.append(ref.reshape(-1))
    assert rel_err(torch.cat(ys), torch.cat(refs)) < BOUNDS[spec]


def test_int4_layout_choice_and_kernel_matches_dequant() -> None:
    odd = build("int4:group=32", gaussian_linear(67, 96))
    even = build("int4:group=32", gaussian_linear(128, 192))
    assert odd.layout == "packed"
    assert even.layout == "int4_cpu"
    x = torch.randn(17, 192)
    ref = x @ even.dequantize().t() + even.bias
    assert rel_err(even(x), ref) < 0.01  # only bf16 activation rounding separates the two


def test_int4_kernel_layout_decodes_exactly() -> None:
    lin = gaussian_linear(128, 192, seed=3)
    state = rtn_group_quantize(lin.weight, 4, 32)
    mod = GroupQuantLinear(state)
    assert mod.layout == "int4_cpu"
    codes, scales, offsets = mod._codes_and_params()
    assert torch.equal(codes, state.codes)
    rows = torch.tensor([0, 5, 63, 64, 127, 5])
    assert torch.allclose(mod.dequantize_rows(rows), mod.dequantize()[rows], atol=1e-6)


def test_int4_large_passes_dequantize_exactly_and_agree_with_the_kernel() -> None:
    """Passes of >= INT4_DEQUANT_MIN_ROWS rows dequantize the CPU layout with a reshape (no gather)."""
    from frugallm.quant import kernels
    from frugallm.quant.group_linear import INT4_DEQUANT_MIN_ROWS

    lin = gaussian_linear(192, 96, bias=False, seed=4)
    mod = GroupQuantLinear(rtn_group_quantize(lin.weight, 4, 32))
    assert mod.layout == "int4_cpu" and mod._dequantizer is not None
    assert torch.equal(mod._dequantizer(mod.qweight, mod.qscale, 32), mod.dequantize(torch.bfloat16))
    assert kernels.INT4_LAYOUTS["int4_cpu"].dequantizer(96) is not None
    x = torch.randn(INT4_DEQUANT_MIN_ROWS + 5, 96, dtype=torch.bfloat16)
    big = mod(x)  # dequantize + GEMM
    small = torch.cat([mod(x[i : i + 8]) for i in range(0, x.shape[0], 8)])  # the packed kernel
    assert rel_err(big.float(), small.float()) < 0.01


def test_int8_kernel_and_dequant_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = build("int8", gaussian_linear(64, 96))
    x = torch.randn(5, 96)
    y_kernel = mod(x)
    monkeypatch.setattr("frugallm.quant.int8.INT8_KERNEL_MAX_ROWS", {})
    assert rel_err(mod(x), y_kernel) < 0.005


def test_half_precision_inputs() -> None:
    lin = gaussian_linear(128, 192)
    x = torch.randn(3, 192)
    ref = lin(x)
    for spec in ("int8", "int4:group=32", "int3:group=32", "llm.int8", "mix4:group=32"):
        mod = build(spec, lin)
        for dtype in (torch.bfloat16, torch.float16):
            y = mod(x.to(dtype))
            assert y.dtype == dtype
            assert rel_err(y, ref) < BOUNDS.get(spec, 0.2) + 0.02, (spec, dtype)


def test_from_linear_constructors_match_methods() -> None:
    lin = gaussian_linear(64, 96)
    x = torch.randn(3, 96)
    for cls, spec in [
        (Int8Linear, "int8"),
        (LLMInt8Linear, "llm.int8"),
        (GroupQuantLinear, "int3:group=32"),
        (Mix4Linear, "mix4:group=32"),
    ]:
        mod = cls.from_linear(lin, parse_quant_spec(spec))
        assert torch.equal(mod(x), build(spec, lin)(x)), spec


def test_group_must_divide_in_features() -> None:
    with pytest.raises(FrugalError, match="group size 64 does not divide in_features 96"):
        build("int4:group=64", gaussian_linear(8, 96))


def test_int8_int8_mm_exact_including_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.randint(-127, 128, (3, 2100), dtype=torch.int8)
    b = torch.randint(-127, 128, (5, 2100), dtype=torch.int8)
    a[0], b[0] = 127, 127  # worst case: 2100 * 127**2 needs more than fp32's 24 mantissa bits
    exact = (a.double() @ b.double().t()).to(torch.int32)
    assert torch.equal(kernels.int8_int8_mm(a, b), exact)
    monkeypatch.delattr(torch, "_int_mm")
    assert torch.equal(kernels.int8_int8_mm(a, b), exact)


# ------------------------------------------------------------------------------------------------ storage


def theoretical_bytes(out_f: int, in_f: int, bits: int, group: int | None, params_per_group: int) -> int:
    """Packed codes plus 16-bit scales/offsets (int8 per-channel: fp32 scale per row)."""
    if group is None:
        return out_f * in_f + 4 * out_f
    return out_f * in_f * bits // 8 + out_f * (in_f // group) * params_per_group * 2


@pytest.mark.parametrize(
    "spec,bits,group,params,shape",
    [
        (*case, shape)
        for case in [
            ("int8", 8, None, 1),
            ("llm.int8", 8, None, 1),
            ("int8:group=32", 8, 32, 2),
            ("int6:group=32", 6, 32, 2),
            ("int4:group=32", 4, 32, 2),
            ("int4:group=64:sym", 4, 64, 1),
            ("int3:group=32", 3, 32, 2),
            ("int2:group=32", 2, 32, 2),
        ]
        for shape in SHAPES
        if not (case[2] and shape[1] % case[2])  # the group size must divide in_features
    ],
)
def test_weight_bytes_match_theory(spec: str, bits: int, group: int | None, params: int, shape: tuple) -> None:
    out_f, in_f = shape
    mod = build(spec, gaussian_linear(out_f, in_f, bias=False))
    if getattr(mod, "layout", "packed") != "packed":
        params = 2  # the int4 kernels take (scale, zero) pairs, also for symmetric codes
    expected = theoretical_bytes(out_f, in_f, bits, group, params)
    assert abs(mod.weight_bytes() - expected) <= 0.05 * expected, (mod.weight_bytes(), expected)


def test_mix4_bytes_and_int4_ratio() -> None:
    lin = gaussian_linear(128, 192, bias=False)
    fp16_bytes = 128 * 192 * 2
    assert build("int4:group=32", lin).weight_bytes() <= 0.32 * fp16_bytes
    mix = build("mix4:group=32", lin)
    expected = 128 * 192 // 2 + 128 * 6 * 2 * 2 + 128 * 2  # codes, scale+offset, 2-bit selectors
    assert abs(mix.weight_bytes() - expected) <= 0.05 * expected


# --------------------------------------------------------------------------------------------- LLM.int8()


def test_llm_int8_outlier_decomposition() -> None:
    lin = gaussian_linear(96, 128)
    x = torch.randn(17, 128)
    x[:, 7] *= 40.0  # systematic outlier features, |x| far above the 6.0 threshold
    x[:, 90] *= 25.0
    with torch.no_grad():
        ref = lin(x)
        regular = lin(x.index_fill(1, torch.tensor([7, 90]), 0.0)) - lin.bias
    # Errors relative to the regular features' share of the output, which the outliers would otherwise
    # hide (they dominate the output norm).
    mixed = LLMInt8Linear.from_linear(lin, parse_quant_spec("llm.int8"))
    plain = LLMInt8Linear.from_linear(lin, parse_quant_spec("llm.int8:threshold=1e9"))  # no outliers
    with torch.no_grad():
        err_mixed = float((mixed(x) - ref).norm() / regular.norm())
        err_plain = float((plain(x) - ref).norm() / regular.norm())
    # Measured 2.6% vs 10.2%. What remains in the mixed result is the int8 rounding of the outlier
    # columns' *weights* (stored int8, as in bitsandbytes) multiplied by the large activations.
    assert err_mixed < 0.04
    assert err_mixed < err_plain / 3, (err_mixed, err_plain)


def test_llm_int8_outlier_columns_use_full_precision_activations() -> None:
    # With every column an outlier, the result is x @ dequantized(W)^T exactly (no activation rounding).
    mod = build("llm.int8:threshold=0.5", gaussian_linear(32, 64))
    x = torch.full((2, 64), 3.0) * torch.randn(2, 64).sign()
    ref = x @ mod.dequantize().t() + mod.bias
    assert rel_err(mod(x), ref) < 1e-5


# -------------------------------------------------------------------------------------------- mix4, auto4


def test_mix4_never_worse_than_int4_asym_and_mixes_types() -> None:
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((64, 256))
    w[:, :32] += 2.0  # shifted groups favour asymmetric grids, heavy tails favour fp4
    mix = mix4_quantize(w, 32)
    levels = Mix4Linear(mix).dequantize()
    rtn = rtn_group_quantize(w, 4, 32).dequantize()
    assert (levels - w).norm() <= (rtn - w).norm() * 1.001
    hist = Mix4Linear(mix).type_histogram()
    assert sum(hist.values()) == 64 * 256 // 32
    assert sum(v > 0 for v in hist.values()) >= 2, hist


def test_auto4_picks_group_by_error() -> None:
    lin = gaussian_linear(64, 256, bias=False)
    pick = lambda tol: build(f"auto4:tol={tol}", lin).group_size  # noqa: E731
    assert pick(0.5) == 128  # Gaussian weights: coarse groups cost little more error than group 32
    assert pick(0.01) == 32  # nothing meets the bound: finest group
    with torch.no_grad():  # a few huge weights inflate the coarse groups' ranges
        lin.weight[:, ::100] *= 30.0
    assert pick(0.5) < 128
    grid = torch.randint(0, 16, (64, 256)).float() * 0.01  # on a group-32 grid already (a Q4_1-like source)
    grid += torch.randn(64, 8).repeat_interleave(32, dim=1) * 0.05
    with torch.no_grad():
        lin.weight.copy_(grid)
    assert pick(0.99) == 32  # any coarser group is far worse than the (near-exact) group 32


# -------------------------------------------------------------------------------------------- group state


def test_group_state_dequantize_roundtrip() -> None:
    w = torch.randn(8, 64)
    st = rtn_group_quantize(w, 8, 32)
    assert isinstance(st, GroupQuantState)
    assert rel_err(st.dequantize(), w) < 0.01
