"""CPU linears on native kernels (csrc/): bf16 on packed weights, weight-only int8, mix4, packed low-bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frugallm import LLM, SamplingParams
from frugallm.model import packed
from frugallm.model.llama import Linear
from frugallm.quant import kernels

needs_native = pytest.mark.skipif(packed.backend(64) != "native", reason="native bf16 kernel unavailable here")


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64, 65, 200, 256])
@pytest.mark.parametrize(("n", "k"), [(16, 2), (100, 64), (3072, 576), (49, 1538)])
@pytest.mark.parametrize("bias", [False, True])
def test_native_kernel_matches_reference(rows: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows * 7 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    p = packed.pack(w, b)
    assert p.kind == "native" and p.weight.shape == (-(-n // 16), k // 2, 16, 2)
    y = packed.linear(x, p, w, b)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    ref = reference(x, w, b)
    # fp32 accumulation then one rounding to bf16: within a bf16 ulp of the exact result, plus fp32 noise
    tol = ref.abs() * 2.0**-8 + 1e-5 * (x.double().abs() @ w.double().abs().t())
    assert ((y.double() - ref).abs() <= tol).all()


@needs_native
def test_many_rows_fall_back_to_f_linear() -> None:
    x = torch.randn(2, packed.NATIVE_MAX_ROWS, 64).bfloat16()  # 512 rows
    w = torch.randn(48, 64).bfloat16()
    assert torch.equal(packed.linear(x, packed.pack(w, None), w, None), F.linear(x, w))


@needs_native
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda x, p: (x.float(), p.weight), "x must be a contiguous bfloat16"),
        (lambda x, p: (x[:, :-2].contiguous(), p.weight), "x has 62 features but the packed weight 64"),
        (lambda x, p: (x, p.weight.float()), "w must be a contiguous bfloat16"),
    ],
)
def test_native_kernel_rejects_bad_inputs(make, message) -> None:
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    xa, wa = make(x, packed.pack(w, None))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.frugallm.bf16_linear(xa, wa, None, 32)
    with pytest.raises(RuntimeError, match="out_features does not match"):
        torch.ops.frugallm.bf16_linear(x, packed.pack(w, None).weight, None, 50)


def test_backend_choice(monkeypatch) -> None:
    assert packed.backend(63) in ("onednn", None)  # odd in_features: no VNNI pairs
    monkeypatch.setenv("FRUGALLM_NATIVE", "0")
    assert packed.backend(64) in ("onednn", None)


@needs_native
@torch.no_grad()
def test_linear_module_repacks_when_the_weight_changes() -> None:
    lin = Linear(64, 40, bias=True).bfloat16()
    x = torch.randn(5, 64).bfloat16()
    first = lin(x)
    assert lin.packed_weight().kind == "native" and lin.packed_bytes == 40 * 64 * 2
    lin.weight.mul_(2)  # in place: new version, the packed copy is remade
    torch.testing.assert_close(lin(x).float(), F.linear(x, lin.weight, lin.bias).float(), rtol=2e-2, atol=2e-2)
    assert not torch.equal(lin(x), first)


@needs_native
def test_native_packed_model_agrees_with_plain(tiny_models) -> None:
    path = str(tiny_models.gguf("llama", "F32"))
    native_llm = LLM(path, dtype="bfloat16", device="cpu", pack_weights=True)
    plain = LLM(path, dtype="bfloat16", device="cpu", pack_weights=False)
    ids = plain.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    a, b = native_llm.score(ids), plain.score(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())
    kinds = {m.packed_weight().kind for m in native_llm.model.modules() if isinstance(m, Linear)}
    assert kinds == {"native"}
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert len(native_llm.generate("hello", p)[0].token_ids) == 8


# -- the native int8 kernel (csrc/int8_linear.cpp) ------------------------------------------------------------
needs_int8 = pytest.mark.skipif(not kernels.native_kernel("int8_linear", torch.device("cpu"), torch.bfloat16),
                                reason="native int8 kernel unavailable here")


@needs_int8
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize(("n", "k"), [(1, 7), (5, 16), (960, 576), (50, 1537)])
def test_native_int8_matches_reference(rows: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(rows + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) / 50
    y = torch.ops.frugallm.int8_linear(x, q, s, None)
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    tol = ref.abs() * 2.0**-8 + 1e-6 * (x.double().abs() @ (q.double().abs() * s.double()[:, None]).t())
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).abs() <= tol).all()


@needs_int8
def test_native_int8_rejects_bad_inputs() -> None:
    x, q, s = torch.randn(2, 8).bfloat16(), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match="x must be a contiguous bfloat16"):
        torch.ops.frugallm.int8_linear(x.float(), q, s, None)
    with pytest.raises(RuntimeError, match="x has 6 features but the weight 8"):
        torch.ops.frugallm.int8_linear(x[:, :6].contiguous(), q, s, None)
    with pytest.raises(RuntimeError, match="scales must be a contiguous float32"):
        torch.ops.frugallm.int8_linear(x, q, s[:3], None)


@needs_int8
@torch.no_grad()
def test_int8_linear_module_uses_the_native_kernel(monkeypatch) -> None:
    from frugallm.quant import Int8Linear, LLMInt8Linear

    lin = torch.nn.Linear(64, 48, bias=False)
    q8 = Int8Linear.from_linear(lin)
    x = torch.randn(3, 64).bfloat16()
    ref = F.linear(x.float(), q8.dequantize()).bfloat16()
    fn = q8.decode_fn(torch.bfloat16, torch.device("cpu"))
    torch.testing.assert_close(fn(x), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(q8(x), ref, rtol=2e-2, atol=2e-2)
    assert fn.__name__ == "<lambda>"  # the kernel itself, not forward
    llm_int8 = LLMInt8Linear.from_linear(lin)
    assert llm_int8.decode_fn(torch.bfloat16, torch.device("cpu")) != q8.decode_fn(torch.bfloat16, torch.device("cpu"))
    monkeypatch.setenv("FRUGALLM_NATIVE", "0")
    assert q8.decode_fn(torch.bfloat16, torch.device("cpu")) == q8.forward


# -- the native mix4 kernel (csrc/mix4_linear.cpp) ------------------------------------------------------------
needs_mix4 = pytest.mark.skipif(not kernels.native_kernel("mix4_linear", torch.device("cpu"), torch.bfloat16),
                                reason="native mix4 kernel unavailable here")


@needs_mix4
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
@pytest.mark.parametrize(("n", "k", "group"), [(1, 64, 32), (7, 576, 32), (40, 1536, 64), (9, 256, 128)])
def test_native_mix4_matches_dequantized(rows: int, n: int, k: int, group: int) -> None:
    from frugallm.quant.mix4 import Mix4Linear
    from frugallm.quant.spec import parse_quant_spec

    torch.manual_seed(rows + n + k)
    m = Mix4Linear.from_linear(torch.nn.Linear(k, n, bias=False), parse_quant_spec(f"mix4:group={group}"))
    x = torch.randn(rows, k).bfloat16()
    y = torch.ops.frugallm.mix4_linear(x, m.qweight, m.selector, m.qscale, m.grids, group, None)
    w = m.dequantize().double()
    ref = x.double() @ w.t()
    tol = ref.abs() * 2.0**-8 + 1e-5 * (x.double().abs() @ w.abs().t())
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).abs() <= tol).all()
    with torch.no_grad():  # the module: the kernel for few rows, dequantize + F.linear beyond
        fn = m.decode_fn(torch.bfloat16, torch.device("cpu"))
        assert fn.__name__ == "<lambda>"
        torch.testing.assert_close(fn(x).float(), m(x).float(), rtol=0, atol=0)
        many = torch.randn(40, k).bfloat16()
        torch.testing.assert_close(m(many).float(), F.linear(many, m.dequantize(torch.bfloat16)).float())


@needs_mix4
def test_native_mix4_rejects_bad_inputs() -> None:
    from frugallm.quant.mix4 import Mix4Linear
    from frugallm.quant.spec import parse_quant_spec

    m = Mix4Linear.from_linear(torch.nn.Linear(64, 8, bias=False), parse_quant_spec("mix4:group=32"))
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="x must be a contiguous bfloat16"):
        torch.ops.frugallm.mix4_linear(x.float(), m.qweight, m.selector, m.qscale, m.grids, 32, None)
    with pytest.raises(RuntimeError, match="group_size % 16 == 0"):
        torch.ops.frugallm.mix4_linear(x, m.qweight, m.selector, m.qscale, m.grids, 24, None)
    with pytest.raises(RuntimeError, match="selector must be a contiguous uint8"):
        torch.ops.frugallm.mix4_linear(x, m.qweight, m.selector[:, :0].contiguous(), m.qscale, m.grids, 32, None)
    with pytest.raises(RuntimeError, match="qscale must be float16 or bfloat16"):
        torch.ops.frugallm.mix4_linear(x, m.qweight, m.selector, m.qscale.float(), m.grids, 32, None)


# -- the native packed low-bit kernel (csrc/lowbit_linear.cpp) -------------------------------------------------
needs_lowbit = pytest.mark.skipif(
    not kernels.native_kernel("lowbit_linear", torch.device("cpu"), torch.bfloat16),
    reason="native low-bit kernel unavailable here",
)


@needs_lowbit
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("n", "k", "group"), [(1, 96, 32), (17, 576, 32), (6, 1536, 64), (33, 384, 128)])
def test_native_lowbit_matches_dequantized(bits: int, symmetric: bool, n: int, k: int, group: int) -> None:
    from frugallm.quant.groups import dequant_groups, rtn_group_quantize
    from frugallm.quant.packing import pack

    torch.manual_seed(bits * 1000 + n + k)
    st = rtn_group_quantize(torch.randn(n, k), bits, group, symmetric)
    # Both 16-bit scale dtypes (the packed layout stores what param_dtype chose).
    for dtype in (torch.float16, torch.bfloat16):
        params = [st.scales] if symmetric else [st.scales, st.offsets]
        qscale = torch.stack(params, -1).to(dtype)
        p = qscale.float()
        w = dequant_groups(st.codes, p[..., 0], None if symmetric else p[..., 1], bits, group).double()
        for rows in (1, 3, 5, 16):
            x = torch.randn(rows, k).bfloat16()
            y = torch.ops.frugallm.lowbit_linear(x, pack(st.codes, bits), qscale, bits, group, None)
            ref = x.double() @ w.t()
            # The bf16 path multiplies 128 + code (exact in bf16) and takes 128 * sum(x) back out: ~2^-17 of
            # sum |x||w| for 2-bit codes, far below the bf16 output's 2^-8, but above the others' 1e-5.
            tol = ref.abs() * 2.0**-8 + 1e-4 * (x.double().abs() @ w.abs().t())
            assert y.dtype == torch.bfloat16 and ((y.double() - ref).abs() <= tol).all(), (dtype, rows)
    bias = torch.randn(n)
    x = torch.randn(2, k).bfloat16()
    qscale = torch.stack([st.scales] if symmetric else [st.scales, st.offsets], -1).half()
    with_bias = torch.ops.frugallm.lowbit_linear(x, pack(st.codes, bits), qscale, bits, group, bias)
    without = torch.ops.frugallm.lowbit_linear(x, pack(st.codes, bits), qscale, bits, group, None)
    torch.testing.assert_close(with_bias.float(), (without.float() + bias), rtol=2e-2, atol=2e-2)


@needs_lowbit
@torch.no_grad()
@pytest.mark.parametrize("spec", ["int3:group=32", "int2:group=32", "int6:group=64", "int8:group=64"])
def test_group_quant_module_uses_the_native_lowbit_kernel(spec: str, monkeypatch) -> None:
    from frugallm.quant import GroupQuantLinear
    from frugallm.quant.spec import parse_quant_spec

    torch.manual_seed(0)
    m = GroupQuantLinear.from_linear(torch.nn.Linear(576, 40, bias=False), parse_quant_spec(spec))
    assert m.layout == "packed"
    x = torch.randn(3, 576).bfloat16()
    fn = m.decode_fn(torch.bfloat16, torch.device("cpu"))
    assert fn.__name__ == "<lambda>"  # the kernel itself, not forward
    ref = F.linear(x.float(), m.dequantize())
    torch.testing.assert_close(fn(x).float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(m(x).float(), fn(x).float(), rtol=0, atol=0)
    torch.testing.assert_close(m(x.float()), ref, rtol=2e-2, atol=2e-2)  # fp32 models compute in bf16 too
    many = torch.randn(40, 576).bfloat16()  # beyond NATIVE_QUANT_MAX_ROWS: dequantize + F.linear
    torch.testing.assert_close(m(many).float(), F.linear(many.float(), m.dequantize()), rtol=2e-2, atol=2e-2)
    m.qscale = m.qscale.float()  # not a layout frugallm writes: the module falls back instead of failing
    torch.testing.assert_close(m(x).float(), ref, rtol=2e-2, atol=2e-2)
    assert m.decode_fn(torch.bfloat16, torch.device("cpu")) == m.forward
    monkeypatch.setenv("FRUGALLM_NATIVE", "0")
    assert m.decode_fn(torch.bfloat16, torch.device("cpu")) == m.forward


@needs_lowbit
@torch.no_grad()
def test_act_order_gptq_runs_the_native_kernel_on_permuted_inputs() -> None:
    from frugallm.quant import GroupQuantLinear
    from frugallm.quant.groups import rtn_group_quantize

    torch.manual_seed(1)
    st = rtn_group_quantize(torch.randn(24, 256), 3, 32)
    st.perm = torch.randperm(256)
    m = GroupQuantLinear(st)
    x = torch.randn(2, 256).bfloat16()
    torch.testing.assert_close(m(x).float(), F.linear(x.float(), m.dequantize()), rtol=2e-2, atol=2e-2)


@needs_lowbit
def test_native_lowbit_rejects_bad_inputs() -> None:
    from frugallm.quant.groups import rtn_group_quantize
    from frugallm.quant.packing import pack

    st = rtn_group_quantize(torch.randn(8, 64), 3, 32)
    q, s = pack(st.codes, 3), torch.stack([st.scales, st.offsets], -1).half()
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="x must be a contiguous bfloat16"):
        torch.ops.frugallm.lowbit_linear(x.float(), q, s, 3, 32, None)
    with pytest.raises(RuntimeError, match="supports 2, 3, 4, 6 and 8 bits, got 5"):
        torch.ops.frugallm.lowbit_linear(x, q, s, 5, 32, None)
    with pytest.raises(RuntimeError, match="group_size % 16 == 0"):
        torch.ops.frugallm.lowbit_linear(x, q, s, 3, 24, None)
    with pytest.raises(RuntimeError, match="packed 3-bit codes"):
        torch.ops.frugallm.lowbit_linear(x, q[:, :-3].contiguous(), s, 3, 32, None)
    with pytest.raises(RuntimeError, match="qscale must be a contiguous"):
        torch.ops.frugallm.lowbit_linear(x, q, s[:, :1].contiguous(), 3, 32, None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32"):
        torch.ops.frugallm.lowbit_linear(x, q, s, 3, 32, torch.zeros(3))
    with pytest.raises(RuntimeError, match="qscale must be float16 or bfloat16, got Float"):
        torch.ops.frugallm.lowbit_linear(x, q, s.float(), 3, 32, None)


@needs_lowbit
@pytest.mark.parametrize(("spec", "n", "k"), [
    (spec, n, k)
    for spec in ["int2:group=32", "int3:group=32:sym", "int4:group=64", "int6:group=128", "int8:group=32"]
    for n, k in [(17, 576), (5, 96), (3, 1536)]
    if k % int(spec.split("group=")[1].split(":")[0]) == 0  # the group size must divide in_features
])
def test_native_dequantize_rounds_once(spec: str, n: int, k: int) -> None:
    """Prefill's dequantize-then-GEMM: the native pass equals the float weight up to one bf16 rounding."""
    from frugallm.quant import GroupQuantLinear
    from frugallm.quant.groups import dequant_groups
    from frugallm.quant.spec import parse_quant_spec

    parsed = parse_quant_spec(spec)
    torch.manual_seed(n + k)
    m = GroupQuantLinear.from_linear(torch.nn.Linear(k, n, bias=False), parsed)
    if m.layout != "packed":
        pytest.skip("int4 runs torch's layout for this shape")
    codes, scales, offsets = m._codes_and_params()
    exact = dequant_groups(codes, scales, offsets, m.bits, m.group_size).double()
    w = m.dequantize(torch.bfloat16)
    assert w.dtype == torch.bfloat16 and w.shape == (n, k)
    assert ((w.double() - exact).abs() <= exact.abs() * 2.0**-8).all()


@needs_mix4
@pytest.mark.parametrize(("n", "k", "group"), [(7, 576, 32), (40, 1536, 64), (9, 256, 128)])
def test_native_mix4_dequantize_rounds_once(n: int, k: int, group: int) -> None:
    from frugallm.quant.mix4 import Mix4Linear
    from frugallm.quant.spec import parse_quant_spec

    torch.manual_seed(n + k)
    m = Mix4Linear.from_linear(torch.nn.Linear(k, n, bias=False), parse_quant_spec(f"mix4:group={group}"))
    exact = m.dequantize(torch.float32).double()  # the torch path
    w = m.dequantize(torch.bfloat16)
    assert w.dtype == torch.bfloat16 and ((w.double() - exact).abs() <= exact.abs() * 2.0**-8).all()


@needs_lowbit
@pytest.mark.parametrize("spec", ["int3:group=32", "int8", "llm.int8", "mix4:group=32"])
def test_batched_decode_through_native_quant_kernels(tiny_models, spec: str) -> None:
    """Batched decode hands the linears strided norm outputs; the native kernels need dense rows (regression:
    the decode plan's norms now return contiguous rows)."""
    llm = LLM(str(tiny_models.gguf("llama", "F32")), quant=spec, device="cpu")
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate(["the quick brown fox", "hello world", "a b c d e f"], p)
    assert [len(o.token_ids) for o in outs] == [6, 6, 6]
    single = llm.generate("hello world", p)[0].token_ids
    assert len(single) == 6
