"""GGUF weights as stored on several input rows (a speculative verify pass, a batch): csrc/gguf_linear.cpp at
r = 2..33 on odd shapes, fp32 and bf16 x, against dequantize-then-matmul and against one-row passes.

Marked ``isa``: ``make test`` reruns this module at ``FRUGALLM_ISA=avx2`` on AVX-512 machines, so each machine
tests every build of the kernel it can execute (the AVX-512 / AVX512-BF16 paths and the AVX2 one).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from frugallm import native
from frugallm.quant import kernels
from frugallm.quant.gguf_linear import GGUFLinear
from gguf_blocks import F16_FIELDS, random_blocks

pytestmark = [pytest.mark.isa,
              pytest.mark.skipif(not native.usable("gguf_linear"), reason="native gguf kernel unavailable here")]

TYPES = list(F16_FIELDS)
ROWS = list(range(2, 34))


def dequantized(raw: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype)).double()


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y == x @ w^T (+ bias) up to fp32 rounding of the sums (relative to sum |x||w|), plus one bf16 rounding of
    the output for bf16 y (the kernel multiplies the exact weight: no bf16 step of w)."""
    xd = x.double()
    ref = xd @ w.T + (0 if bias is None else bias.double())
    bound = (xd.abs() @ w.abs().T) * 1e-5 + (0 if bias is None else bias.double().abs() * 2.0**-23) + 1e-30
    if y.dtype == torch.bfloat16:
        bound = bound + (ref.abs() + bound) * 2.0**-8
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())


def odd_shape(qtype: T) -> tuple[int, int]:
    """(out, in): an odd output count (a tail past every unroll and thread split), an odd number of blocks."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return 37, block * (3 if block == 256 else 7)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_2_to_33_match_dequantize_then_matmul_and_one_row(qtype: T, x_dtype: torch.dtype) -> None:
    """Every r in 2..33 (one pass, several passes, a partial last pass): the product is dequantize-then-matmul up
    to fp32 rounding, and each output row is bit-identical to that row run alone (what one-row decode computes)."""
    n, k = odd_shape(qtype)
    raw_np = random_blocks(qtype, n, k, seed=int(qtype))
    raw, w = torch.from_numpy(raw_np), dequantized(raw_np, qtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    x = torch.randn(max(ROWS), k, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    alone = torch.cat([torch.ops.frugallm.gguf_linear(x[i : i + 1], raw, int(qtype), n, bias)
                       for i in range(max(ROWS))])
    assert_close(alone, x.float(), w, bias)
    for r in ROWS:
        y = torch.ops.frugallm.gguf_linear(x[:r], raw, int(qtype), n, bias)
        assert y.shape == (r, n) and y.dtype == x_dtype
        assert torch.equal(y, alone[:r]), r


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_rows_do_not_depend_on_threads(qtype: T, x_dtype: torch.dtype, one_thread) -> None:
    """Output rows split over threads compute exactly what one thread does (each row's arithmetic is its own)."""
    n, k = 131, gguf.GGML_QUANT_SIZES[qtype][0] * 2
    raw = torch.from_numpy(random_blocks(qtype, n, k, seed=5))
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(6)).to(x_dtype)
    single = torch.ops.frugallm.gguf_linear(x, raw, int(qtype), n, None)
    torch.set_num_threads(2)
    assert torch.equal(torch.ops.frugallm.gguf_linear(x, raw, int(qtype), n, None), single)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_module_verify_pass_equals_one_row_steps(x_dtype: torch.dtype) -> None:
    """GGUFLinear as Q4_K_M files make it (Q4_K rows fused with Q6_K rows): a pass of up to its few-rows cap
    (GGUF_FP32_MAX_ROWS with fp32 x; with bf16 x NATIVE_QUANT_MAX_ROWS here, the Q4_K segment of 29 rows staying in
    the stored layout: speculative verify, batched decode) gives each
    row bit for bit what its one-row decode step gives, through forward and through the decode plan's decode_fn;
    above the cap (dequantize-then-GEMM) it stays close."""
    k = 512
    q4, q6 = random_blocks(T.Q4_K, 29, k, 3), random_blocks(T.Q6_K, 7, k, 4)
    mod = GGUFLinear.from_segments([(T.Q4_K, q4, 29), (T.Q6_K, q6, 7)], k, torch.randn(36))
    w = torch.cat([dequantized(q4, T.Q4_K), dequantized(q6, T.Q6_K)])
    fn = mod.decode_fn(x_dtype, torch.device("cpu"))
    cap = mod.few_rows_limit(x_dtype)
    assert cap == (kernels.GGUF_FP32_MAX_ROWS if x_dtype == torch.float32 else kernels.NATIVE_QUANT_MAX_ROWS)
    x = torch.randn(cap + 3, k, generator=torch.Generator().manual_seed(7)).to(x_dtype)
    steps = torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])
    for r in sorted({2, 3, 5, 8, 9, 16, 17, cap} & set(range(cap + 1))):
        assert torch.equal(fn(x[:r]), steps[:r]), r
        assert torch.equal(mod(x[:r]), steps[:r]), r
    over = mod(x)  # above the cap: dequantize-then-GEMM (bf16 x: on the weight rounded to bf16)
    ref = x.double() @ w.T + mod.bias.double()
    bound = (x.double().abs() @ w.abs().T) * (1e-5 if x_dtype == torch.float32 else 2.0**-6) + 1e-30
    assert ((over.double() - ref).abs() <= bound + ref.abs() * (0 if x_dtype == torch.float32 else 2.0**-8)).all()
