"""Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 repacked with 16 rows interleaved (csrc/gguf_x16_b32.cpp) and their use by
GGUFLinear: the repack is lossless, the linear is dequantize-then-matmul up to fp32 rounding with each row
bit-identical to its one-row pass, dequantizing a repacked segment is the reference's dequantization bit for bit, and
models built of these types decode the same with and without the repack.

Marked ``isa``: ``make test`` reruns this module at ``FRUGALLM_ISA=avx2`` on AVX-512 machines, so each machine
tests every build of the kernel it can execute (AVX512-BF16's vdpbf16ps path, AVX-512 and AVX2 FMA paths).
"""

from __future__ import annotations

from typing import Any

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as T

from frugallm import LLM, SamplingParams, native
from frugallm.errors import FrugalError
from frugallm.quant import gguf_linear as gl
from frugallm.quant.gguf_linear import GGUFLinear, set_act_quant
from gguf_blocks import random_blocks

pytestmark = [pytest.mark.isa,
              pytest.mark.skipif(not (native.usable("gguf_x16_b32") and native.usable("gguf_linear")),
                                 reason="native gguf_x16_b32 kernel unavailable here")]

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
QTYPES = pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
SHAPES = [(16, 32), (48, 224), (272, 608)]  # (N, K): N multiples of 16, odd numbers of 32-value blocks
ROWS = list(range(1, 18))  # one row, several 4-row passes, a partial last pass
OPS = torch.ops.frugallm


def repack(raw: torch.Tensor, qt: T) -> torch.Tensor:
    return OPS.gguf_x16_b32_repack(raw, int(qt))


def dequantized(raw: Any, qt: T) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw.numpy() if isinstance(raw, torch.Tensor) else raw, qt))


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y == x @ w^T (+ bias) up to fp32 rounding of the sums (relative to sum |x||w|), plus one bf16 rounding of
    the output for bf16 y (the bound tests/loading/test_gguf_x16.py puts on Q4_K / Q6_K)."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (0 if bias is None else bias.double())
    bound = (xd.abs() @ wd.abs().T) * 1e-5 + (0 if bias is None else bias.double().abs() * 2.0**-23) + 1e-30
    if y.dtype == torch.bfloat16:
        bound = bound + (ref.abs() + bound) * 2.0**-8
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())


@QTYPES
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=lambda v: str(v))
def test_repack_is_lossless_and_dequantizes_bit_for_bit(n: int, k: int, qt: T, monkeypatch) -> None:
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "1")
    raw = torch.from_numpy(random_blocks(qt, n, k, seed=n + k))
    w16 = repack(raw, qt)
    assert w16.shape == (n // 16, raw.shape[1] * 16) and w16.numel() == raw.numel()  # the same bytes
    assert not torch.equal(w16.reshape(raw.shape), raw)  # really interleaved
    assert torch.equal(OPS.gguf_x16_b32_unpack(w16, int(qt), n, None), raw)
    idx = torch.tensor([n - 1, 0, 17 % n, n - 1])
    assert torch.equal(OPS.gguf_x16_b32_unpack(w16, int(qt), n, idx), raw[idx])
    lin = GGUFLinear([(int(qt), raw, n)], k)
    assert lin.segments[0].layout == "x16" and torch.equal(lin.raw(0), w16)
    ref = dequantized(raw, qt)
    assert torch.equal(lin.dequantize(torch.float32), ref)
    assert torch.equal(lin.dequantize_rows(idx), ref[idx])
    assert torch.equal(lin.dequantize(torch.bfloat16), ref.to(torch.bfloat16))


@QTYPES
def test_every_code_at_every_position_round_trips(qt: T) -> None:
    """Each of the 16 rows holds every code at every position of a block (codes (row + value) % 16, % 32 for Q5,
    % 256 as int8 for Q8_0): unpacked bit for bit, and the linear against one-hot x reads back each code times its
    scale."""
    raw = torch.from_numpy(random_blocks(qt, 16, 32, seed=3))
    bits = {T.Q8_0: 8, T.Q5_0: 5, T.Q5_1: 5}.get(qt, 4)
    codes = (torch.arange(16)[:, None] + 3 * torch.arange(32)[None]) % (1 << bits)  # [16, 32]
    if qt == T.Q8_0:
        raw[:, 2:] = codes.to(torch.uint8)
    else:
        off = raw.shape[1] - 16  # the 16 qs bytes: value i in the low nibble of byte i % 16 (i < 16), else high
        raw[:, off:] = ((codes[:, :16] & 15) | ((codes[:, 16:] & 15) << 4)).to(torch.uint8)
        if bits == 5:  # qh (4 bytes before qs, little endian): bit i is value i's 5th bit
            qh = ((codes >> 4) << torch.arange(32)).sum(1)
            raw[:, off - 4 : off] = torch.stack([(qh >> (8 * j)) & 255 for j in range(4)], 1).to(torch.uint8)
    ref = dequantized(raw, qt)
    d = torch.from_numpy(raw[:, :2].numpy().copy().view("float16").astype("float32"))  # [16, 1]
    zero = {T.Q4_0: 8, T.Q5_0: 16}.get(qt, 0)
    base = torch.from_numpy(raw[:, 2:4].numpy().copy().view("float16").astype("float32")) if qt in (T.Q4_1, T.Q5_1) \
        else 0
    signed = codes.to(torch.int8).float() if qt == T.Q8_0 else (codes - zero).float()
    torch.testing.assert_close(ref, d * signed + base, rtol=0, atol=0)  # codes placed as meant
    w16 = repack(raw, qt)
    assert torch.equal(OPS.gguf_x16_b32_unpack(w16, int(qt), 16, None), raw)
    w = ref
    for dtype in (torch.float32, torch.bfloat16):
        y = OPS.gguf_x16_b32_linear(torch.eye(32, dtype=dtype), w16, int(qt), 16, None)  # [32 values, 16 rows]
        assert torch.equal(y.float(), w.T.to(dtype).float()), dtype


@QTYPES
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=lambda v: str(v))
def test_linear_matches_dequantize_then_matmul_and_one_row(n: int, k: int, x_dtype: torch.dtype, qt: T) -> None:
    """Every r in 1..17: dequantize-then-matmul up to fp32 rounding, each row bit-identical to that row alone."""
    raw = torch.from_numpy(random_blocks(qt, n, k, seed=2 * n + k))
    w, w16 = dequantized(raw, qt), repack(raw, qt)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(max(ROWS), k, generator=g).to(x_dtype)
    for bias in (None, torch.randn(n, generator=g)):
        alone = torch.cat([OPS.gguf_x16_b32_linear(x[i : i + 1], w16, int(qt), n, bias) for i in range(max(ROWS))])
        assert alone.dtype == x_dtype
        assert_close(alone, x.float(), w, bias)
        for r in ROWS:
            y = OPS.gguf_x16_b32_linear(x[:r], w16, int(qt), n, bias)
            assert y.shape == (r, n) and torch.equal(y, alone[:r]), r
    assert OPS.gguf_x16_b32_linear(x[:0], w16, int(qt), n, None).shape == (0, n)


@QTYPES
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_do_not_depend_on_threads(x_dtype: torch.dtype, qt: T, one_thread) -> None:
    n, k = 96, 544
    w16 = repack(torch.from_numpy(random_blocks(qt, n, k, seed=9)), qt)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(10)).to(x_dtype)
    single = OPS.gguf_x16_b32_linear(x, w16, int(qt), n, None)
    torch.set_num_threads(2)
    assert torch.equal(OPS.gguf_x16_b32_linear(x, w16, int(qt), n, None), single)


def test_bad_inputs_are_clear_errors() -> None:
    raw = torch.from_numpy(random_blocks(T.Q4_1, 16, 64, seed=1))
    w16 = repack(raw, T.Q4_1)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        repack(raw[:8], T.Q4_1)
    with pytest.raises(RuntimeError, match="whole number of 20-byte blocks"):
        repack(raw[:, :30], T.Q4_1)
    with pytest.raises(RuntimeError, match=r"only Q4_0 \(2\), Q4_1 \(3\), Q5_0 \(6\), Q5_1 \(7\) and Q8_0"):
        repack(raw, T.Q4_K)
    with pytest.raises(RuntimeError, match=r"only Q4_0 \(2\), Q4_1 \(3\), Q5_0 \(6\), Q5_1 \(7\) and Q8_0"):
        OPS.gguf_x16_b32_linear(torch.randn(1, 64), w16, int(T.Q4_K), 16, None)
    with pytest.raises(RuntimeError, match="bytes"):  # Q4_1's repacked size is not Q4_0's
        OPS.gguf_x16_b32_linear(torch.randn(1, 64), w16, int(T.Q4_0), 16, None)
    with pytest.raises(RuntimeError, match="bytes"):
        OPS.gguf_x16_b32_linear(torch.randn(1, 96), w16, int(T.Q4_1), 16, None)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        OPS.gguf_x16_b32_linear(torch.randn(1, 40), w16, int(T.Q4_1), 16, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS.gguf_x16_b32_linear(torch.randn(1, 64).half(), w16, int(T.Q4_1), 16, None)
    with pytest.raises(RuntimeError, match="bias"):
        OPS.gguf_x16_b32_linear(torch.randn(1, 64), w16, int(T.Q4_1), 16, torch.zeros(8))
    with pytest.raises(RuntimeError, match="out of range"):
        OPS.gguf_x16_b32_unpack(w16, int(T.Q4_1), 16, torch.tensor([16]))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gguf_linear_repacks_segments_of_16k_rows(x_dtype: torch.dtype, monkeypatch) -> None:
    """A fused Q4_1 (x16) + Q8_0 (x16) + Q4_0-of-40-rows (N % 16 != 0: stays stored) + Q5_1 (x16) + Q2_K (not
    repacked) linear: its few-row passes (forward and decode_fn) equal the x16 / stored-block kernels per segment;
    prefill-size passes dequantize the unpacked blocks; q8 mode keeps (and restores) the stored layout."""
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "1")
    k = 256
    segs_np = [(T.Q4_1, 48, 1), (T.Q8_0, 32, 2), (T.Q4_0, 40, 3), (T.Q5_1, 16, 6), (T.Q2_K, 16, 7)]
    segs: list[tuple[int, Any, int]] = [(int(t), torch.from_numpy(random_blocks(t, n, k, seed=s)), n)
                                        for t, n, s in segs_np]
    bias = torch.randn(152, generator=torch.Generator().manual_seed(4))
    lin = GGUFLinear(segs, k, bias)
    assert [s.layout for s in lin.segments] == ["x16", "x16", "stored", "x16", "stored"]
    assert "Q4_1x48(x16)" in lin.extra_repr() and "Q8_0x32(x16)" in lin.extra_repr()
    w = torch.cat([dequantized(r, T(t)) for t, r, _ in segs])
    x = torch.randn(lin.few_rows_limit(x_dtype) + 3, k, generator=torch.Generator().manual_seed(5)).to(x_dtype)
    few = x[:5]
    y = lin(few)
    assert_close(y, few.float(), w, bias)
    assert torch.equal(y[:, :48], OPS.gguf_x16_b32_linear(few, lin.raw(0), int(T.Q4_1), 48, bias[:48]))
    assert torch.equal(y[:, 48:80], OPS.gguf_x16_b32_linear(few, lin.raw(1), int(T.Q8_0), 32, bias[48:80]))
    assert torch.equal(y[:, 80:120], OPS.gguf_linear(few, segs[2][1], segs[2][0], 40, bias[80:120]))
    assert torch.equal(y[:, 120:136], OPS.gguf_x16_b32_linear(few, lin.raw(3), int(T.Q5_1), 16, bias[120:136]))
    assert torch.equal(y[:, 136:], OPS.gguf_linear(few, segs[4][1], segs[4][0], 16, bias[136:]))
    assert torch.equal(lin.decode_fn(x_dtype, torch.device("cpu"))(few), y)
    big = lin(x)  # prefill: dequantize (unpacked blocks, in x's dtype) then F.linear
    assert torch.equal(big, torch.nn.functional.linear(x, lin.dequantize(x_dtype), bias.to(x_dtype)))
    assert [s.layout for s in GGUFLinear(segs, k, bias, act_quant="q8").segments] == ["stored"] * 5
    assert set_act_quant(torch.nn.Sequential(lin), "q8") == 1
    assert [s.layout for s in lin.segments] == ["stored"] * 5
    assert all(torch.equal(lin.raw(i), segs[i][1]) for i in range(5))


def test_env_switch_and_default(monkeypatch) -> None:
    """Default: the 32-value types are repacked at every level the kernel runs (AVX2 and above); 0 turns it off;
    type names repack those types only."""
    segs = [(int(t), torch.from_numpy(random_blocks(t, 32, 64, seed=12 + i)), 32) for i, t in enumerate(TYPES)]
    monkeypatch.delenv("FRUGALLM_GGUF_X16", raising=False)
    assert [s.layout for s in GGUFLinear(segs, 64).segments] == ["x16"] * 5
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "0")
    assert [s.layout for s in GGUFLinear(segs, 64).segments] == ["stored"] * 5
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "q8_0,Q4_0,Q5_1")
    assert [s.layout for s in GGUFLinear(segs, 64).segments] == ["x16", "stored", "stored", "x16", "x16"]
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "Q5_K")
    with pytest.raises(FrugalError, match="Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q6_K, Q8_0"):
        GGUFLinear(segs, 64)


@pytest.mark.parametrize("tensor_type", ["Q4_1", "Q4_0", "Q5_0"])
def test_tiny_model_decodes_the_same_without_the_repack(tensor_type: str, tiny_models, tiny_ids,
                                                        monkeypatch) -> None:
    """A tiny llama of Q4_1 (or Q4_0, Q5_0) layers and a tied Q8_0 head / embedding, repacked vs not: fp32 decode logits
    equal to fp32 rounding and the same greedy tokens (single stream and batched); in the default decode dtype the
    logits agree to bf16 precision."""
    monkeypatch.delenv("FRUGALLM_GGUF_X16", raising=False)
    kw = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "tie_word_embeddings": True}
    path = str(tiny_models.gguf("llama", tensor_type, embed_type="Q8_0", **kw))
    x16 = LLM(path, device="cpu")
    layouts = {(s.qtype, s.layout) for m in x16.model.modules() if isinstance(m, GGUFLinear) for s in m.segments}
    assert {(int(T[tensor_type]), "x16"), (int(T.Q8_0), "x16")} <= layouts
    monkeypatch.setattr(gl, "repacks", lambda *a: False)
    stored = LLM(path, device="cpu")
    assert all(s.layout == "stored" for m in stored.model.modules() if isinstance(m, GGUFLinear) for s in m.segments)

    def decode(llm: LLM) -> torch.Tensor:
        prompt, steps = tiny_ids[:8], tiny_ids[8:24]
        cache = llm.make_cache(1, len(prompt) + len(steps))
        with torch.inference_mode():
            llm.model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
            return torch.cat([llm.model(torch.tensor([[t]]), torch.tensor([[len(prompt) + i]]), cache)
                              for i, t in enumerate(steps)])

    default = decode(x16), decode(stored)
    assert (default[0] - default[1]).abs().max() <= 0.02 * default[1].abs().max()
    for llm in (x16, stored):
        llm.model.decode_dtype = torch.float32
    torch.testing.assert_close(decode(x16), decode(stored), atol=1e-4, rtol=0)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = ["hello world", "the cat sat on", "1 2 3"]
    got, want = x16.generate(prompts, params), stored.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.slow
def test_default_model_greedy_tokens_unchanged_by_the_repack(monkeypatch) -> None:
    """SmolLM2-135M (Q4_1 layers, tied Q8_0 head) in fp32: 32 greedy tokens with the x16 layout equal those of the
    stored-block kernel (FRUGALLM_GGUF_X16=0)."""
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompt = "The three most important ideas in computer science are"
    out = {}
    for flag in ("auto", "0"):
        monkeypatch.setenv("FRUGALLM_GGUF_X16", flag)
        llm = LLM("default")  # weights as stored; then fp32 activations in every pass
        llm.model.decode_dtype = llm.model.prefill_dtype = torch.float32
        segs = [s for m in llm.model.modules() if isinstance(m, GGUFLinear) for s in m.segments]
        assert {s.qtype for s in segs} >= {int(T.Q4_1), int(T.Q8_0)}
        assert all(s.layout == ("x16" if flag == "auto" else "stored") for s in segs if s.rows % 16 == 0), flag
        out[flag] = llm.generate(prompt, params)[0].token_ids
    assert len(out["auto"]) == 32 and out["auto"] == out["0"]
