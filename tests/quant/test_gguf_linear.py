"""GGUF blocks run as stored (csrc/gguf_linear.cpp, quant/gguf_linear.py) against gguf.quants.dequantize."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from frugallm import native
from frugallm.errors import FrugalError
from frugallm.quant.gguf_linear import GGUFLinear, as_uint8, row_bytes, segment_from_reader, unpermute_rows
from gguf_blocks import F16_FIELDS, random_blocks

needs_native = pytest.mark.skipif(not native.usable("gguf_linear"), reason="native gguf kernel unavailable here")

TYPES = list(F16_FIELDS)


def reference(raw: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype))


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                        bf16_weight: bool = True) -> None:
    """y == x @ w^T (+ bias) up to fp32 rounding (relative to sum |x||w|); for bf16 y, plus its one rounding to
    bf16 (half a step: 2^-8 relative) and, with ``bf16_weight``, one bf16 step of the weight (bf16 prefill
    dequantizes to bf16; F16 segments multiply in bf16). The raw op on bf16 x multiplies the exact weight in fp32
    and rounds its output once: ``bf16_weight=False``."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (0 if bias is None else bias.double())
    # fp32 rounding of the products' sum, and of adding the bias to it (a bias far above a tiny row's sum)
    bound = (xd.abs() @ wd.abs().T) * 1e-5 + (0 if bias is None else bias.double().abs() * 2.0**-23) + 1e-30
    if y.dtype == torch.bfloat16:
        bound = bound + (ref.abs() + bound) * 2.0**-8
        if bf16_weight:
            bound = bound + (xd.abs() @ wd.abs().T) * 2.0**-8
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_reference_exactly(qtype: T, dtype: torch.dtype) -> None:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for n, blocks in ((37, 1), (1, 3), (5, 2)):
        raw = random_blocks(qtype, n, block * blocks, seed=n)
        got = torch.ops.frugallm.gguf_dequantize(torch.from_numpy(raw), int(qtype), block * blocks, dtype)
        assert got.dtype == dtype and torch.equal(got, reference(raw, qtype).to(dtype))


@needs_native
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 1), (1, 3), (19, 2)], ids=lambda s: f"n{s[0]}-b{s[1]}")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_linear_matches_dequantize_then_matmul(qtype: T, shape: tuple[int, int], x_dtype: torch.dtype) -> None:
    n, blocks = shape
    k = gguf.GGML_QUANT_SIZES[qtype][0] * blocks
    raw = random_blocks(qtype, n, k, seed=n + blocks)
    w = reference(raw, qtype)
    bias = torch.randn(n)
    for rows in range(1, 9):
        x = torch.randn(rows, k).to(x_dtype)
        for b in (None, bias):
            y = torch.ops.frugallm.gguf_linear(x, torch.from_numpy(raw), int(qtype), n, b)
            assert y.shape == (rows, n) and y.dtype == x_dtype
            assert_matmul_close(y, x.float(), w, b, bf16_weight=False)


@needs_native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bf16_x_rounds_the_exact_product(qtype: T) -> None:
    """bf16 x (vdpbf16ps on AVX512-BF16): the output is the exact x @ w^T rounded to bf16, but where fp32 rounding
    of the sums lands across a rounding boundary (then one bf16 step away): fp32-level error, not bf16's."""
    k = gguf.GGML_QUANT_SIZES[qtype][0] * 8
    raw = random_blocks(qtype, 96, k, seed=7)
    w = reference(raw, qtype).double()
    gen = torch.Generator().manual_seed(int(qtype))
    for rows in (1, 3, 4, 6):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        y = torch.ops.frugallm.gguf_linear(x, torch.from_numpy(raw), int(qtype), 96, None)
        ref = x.double() @ w.T
        exact = ref.bfloat16()
        same = y == exact
        assert same.float().mean() >= 0.97, same.float().mean()
        # elsewhere one bf16 step at |ref| (2^-7 relative), or fp32 rounding where the sum nearly cancels
        bound = ref.abs() * 2.0**-7 * 1.01 + (x.double().abs() @ w.abs().T) * 1e-5
        assert ((y.double() - exact.double()).abs() <= bound).all()


def mixed_module(bias: bool = True) -> tuple[GGUFLinear, torch.Tensor, torch.Tensor | None]:
    """A fused linear as Q4_K_M files make them: Q4_K rows, then Q6_K, then F16; with its dense weight."""
    k = 512
    q4, q6 = random_blocks(T.Q4_K, 37, k, 1), random_blocks(T.Q6_K, 5, k, 2)
    f16 = torch.randn(3, k).half()
    b = torch.randn(45) if bias else None
    mod = GGUFLinear.from_segments([(T.Q4_K, q4, 37), (T.Q6_K, q6, 5), (T.F16, f16.view(torch.uint8), 3)], k, b)
    return mod, torch.cat([reference(q4, T.Q4_K), reference(q6, T.Q6_K), f16.float()]), b


@needs_native
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_mixed_segments_module(x_dtype: torch.dtype) -> None:
    mod, w, b = mixed_module()
    assert mod.out_features == 45 and mod.in_features == 512
    assert mod.weight_bytes() == 37 * 288 + 5 * 420 + 3 * 1024 + 45 * 4
    assert torch.equal(mod.dequantize(), w)
    fn = mod.decode_fn(x_dtype, torch.device("cpu"))
    for rows in (1, 4, 16, 40):  # 40: the prefill path (dequantize + F.linear)
        x = torch.randn(rows, 512).to(x_dtype)
        y = mod(x)
        assert y.shape == (rows, 45) and y.dtype == x_dtype
        assert_matmul_close(y, x.float(), w, b)
        assert torch.equal(fn(x), y)
    x3 = torch.randn(2, 3, 512)
    assert mod(x3).shape == (2, 3, 45)
    rows = torch.tensor([44, 0, 38, 40])
    assert torch.equal(mod.dequantize_rows(rows), w[rows])


@needs_native
def test_single_segment_decode_fn_is_the_raw_op() -> None:
    raw = random_blocks(T.Q8_0, 20, 64)
    mod = GGUFLinear.from_segments([(T.Q8_0, raw, 20)], 64)
    x = torch.randn(3, 64)
    assert torch.equal(mod.decode_fn(torch.float32, torch.device("cpu"))(x), mod(x))
    assert_matmul_close(mod(x), x, reference(raw, T.Q8_0))


def test_torch_fallback_equals_native(monkeypatch) -> None:
    mod, w, b = mixed_module()
    x = torch.randn(3, 512)
    native_y = mod(x) if native.usable("gguf_linear") else None
    monkeypatch.setenv("FRUGALLM_NATIVE", "0")
    assert not native.usable("gguf_linear")
    assert mod.decode_fn(torch.float32, torch.device("cpu")) == mod.forward
    assert torch.equal(mod.dequantize(), w)
    y = mod(x)
    assert_matmul_close(y, x, w, b)
    if native_y is not None:
        assert torch.allclose(y, native_y, rtol=1e-4, atol=1e-4)
    assert mod(x.bfloat16()).dtype == torch.bfloat16


@needs_native
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w, x: torch.ops.frugallm.gguf_linear(x, w[:, :-1].contiguous(), int(T.Q4_K), 4, None),
         "bytes per row"),
        (lambda w, x: torch.ops.frugallm.gguf_linear(x[:, :100].contiguous(), w, int(T.Q4_K), 4, None),
         "multiple of 256"),
        (lambda w, x: torch.ops.frugallm.gguf_linear(x, w, 99, 4, None), "unsupported GGUF qtype"),
        (lambda w, x: torch.ops.frugallm.gguf_linear(x, w, int(T.Q4_K), 5, None), "out_features"),
        (lambda w, x: torch.ops.frugallm.gguf_linear(x.half(), w, int(T.Q4_K), 4, None), "float32 or bfloat16"),
        (lambda w, x: torch.ops.frugallm.gguf_linear(x, w, int(T.Q4_K), 4, torch.zeros(3)), "bias"),
        (lambda w, x: torch.ops.frugallm.gguf_dequantize(w, int(T.Q4_K), 256, torch.int32), "dtype"),
        (lambda w, x: torch.ops.frugallm.gguf_dequantize(w, int(T.Q6_K), 256, torch.float32), "bytes per row"),
    ],
)
def test_kernel_rejects_bad_inputs(call, message) -> None:
    w, x = torch.from_numpy(random_blocks(T.Q4_K, 4, 256)), torch.randn(2, 256)
    with pytest.raises(RuntimeError, match=message):
        call(w, x)


def test_module_rejects_bad_segments() -> None:
    with pytest.raises(FrugalError, match="IQ2_XXS cannot run as stored|cannot run as stored"):
        GGUFLinear.from_segments([(T.IQ2_XXS, np.zeros(66, np.uint8), 1)], 256)
    with pytest.raises(FrugalError, match="bytes"):
        GGUFLinear.from_segments([(T.Q4_0, np.zeros(17, np.uint8), 1)], 32)
    with pytest.raises(FrugalError, match="multiple of 256"):
        row_bytes(T.Q4_K, 100)
    with pytest.raises(FrugalError, match="features"):
        GGUFLinear.from_segments([(T.Q8_0, random_blocks(T.Q8_0, 2, 32), 2)], 32)(torch.randn(1, 64))


def test_read_only_memmap_is_shared_without_warning(tmp_path) -> None:
    raw = random_blocks(T.Q4_0, 6, 64)
    path = tmp_path / "blocks.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r").reshape(6, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = as_uint8(mm)
    assert t.data_ptr() == mm.ctypes.data  # no copy
    mod = GGUFLinear.from_segments([(T.Q4_0, mm, 6)], 64)
    assert torch.equal(mod.dequantize(), reference(raw, T.Q4_0))


def test_unpermute_rows_matches_dense_unpermute() -> None:
    n_head, n, k = 4, 32, 256
    raw = random_blocks(T.Q5_K, n, k)
    dense = reference(raw, T.Q5_K).numpy()
    # loading/gguf._unpermute on the dequantized weight
    expected = dense.reshape(n_head, n // n_head // 2, 2, k).swapaxes(1, 2).reshape(n, k)
    got = gguf.quants.dequantize(unpermute_rows(torch.from_numpy(raw), n_head).numpy(), T.Q5_K)
    assert np.array_equal(got, expected)


def test_from_reader_tensors(tmp_path) -> None:
    rng = np.random.default_rng(3)
    wq = rng.standard_normal((16, 64)).astype(np.float32)
    wv = rng.standard_normal((8, 64)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, w in (("q", wq), ("v", wv)):
        writer.add_tensor(name, gguf.quants.quantize(w, T.Q8_0), raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    qtype, raw, n = segment_from_reader(tensors["q"])
    assert (qtype, n, tuple(raw.shape)) == (int(T.Q8_0), 16, (16, 68))
    mod = GGUFLinear.from_reader_tensors([tensors["q"], tensors["v"]], n_heads=[2, None])
    assert (mod.in_features, mod.out_features) == (64, 24)
    dq = gguf.quants.dequantize(gguf.quants.quantize(wq, T.Q8_0), T.Q8_0)
    q_rows = dq.reshape(2, 4, 2, 64).swapaxes(1, 2).reshape(16, 64)
    v_rows = gguf.quants.dequantize(gguf.quants.quantize(wv, T.Q8_0), T.Q8_0)
    assert torch.equal(mod.dequantize(), torch.from_numpy(np.concatenate([q_rows, v_rows])))


@needs_native
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_do_not_depend_on_the_pass(qtype: T, x_dtype: torch.dtype) -> None:
    """Each output row is bit-identical whether its input runs alone or among up to 16 rows (any split into
    passes): a speculative verify pass or a batch computes each row exactly as one-row decode does."""
    k = gguf.GGML_QUANT_SIZES[qtype][0] * 3
    raw = torch.from_numpy(random_blocks(qtype, 21, k, seed=11))
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    alone = torch.cat([torch.ops.frugallm.gguf_linear(x[i : i + 1], raw, int(qtype), 21, None) for i in range(16)])
    for rows in (2, 5, 8, 9, 16):
        assert torch.equal(torch.ops.frugallm.gguf_linear(x[:rows], raw, int(qtype), 21, None), alone[:rows]), rows


@needs_native
@pytest.mark.parametrize("x16", [False, True], ids=["stored", "x16"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_many_rows_dequantize_in_tiles(x16: bool, x_dtype: torch.dtype, monkeypatch) -> None:
    """A prefill pass dequantizes PREFILL_TILE_ROWS output rows at a time (tiles that split segments, stored
    and x16-repacked ones): still dequantize-then-matmul, bias included."""
    import frugallm.quant.gguf_linear as gl

    monkeypatch.setenv("FRUGALLM_GGUF_X16", "1" if x16 else "0")
    monkeypatch.setattr(gl, "PREFILL_TILE_ROWS", 16)
    k = 512
    q4, q6 = random_blocks(T.Q4_K, 48, k, 3), random_blocks(T.Q6_K, 5, k, 4)
    b = torch.randn(53)
    mod = GGUFLinear.from_segments([(T.Q4_K, q4, 48), (T.Q6_K, q6, 5)], k, b)
    if x16 and native.usable("gguf_x16"):
        assert mod.segments[0].layout == "x16"
    w = torch.cat([reference(q4, T.Q4_K), reference(q6, T.Q6_K)])
    x = torch.randn(40, k).to(x_dtype)
    y = mod(x)
    assert y.shape == (40, 53) and y.dtype == x_dtype
    assert_matmul_close(y, x.float(), w, b)
