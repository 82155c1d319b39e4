"""Q4_K and Q6_K in the x16b layouts with int8 activations (``gguf_x16_linear_q8``, csrc/gguf_x16.cpp;
``weights="stored-q8"``): the activations are quantized exactly as ``gguf_linear_q8`` does (csrc/gguf_q8_act.h), so
both kernels equal the quantized reference (``q8_quantize``'s codes times the dequantized weight) up to fp32
rounding; every row is bit-identical to its one-row pass, at any thread count.

Marked ``isa``: ``make test`` reruns this module at ``FRUGALLM_ISA=avx2`` on AVX-512 machines (vpdpbusd at
AVX512-VNNI, maddubs + madd on 512-bit vectors at plain AVX-512, 256-bit halves at AVX2).
"""

from __future__ import annotations

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as T

from frugallm import LLM, cpu, native
from frugallm.quant import gguf_linear as gl
from frugallm.quant.gguf_linear import GGUFLinear, q8_dequantize_input
from gguf_blocks import random_blocks

pytestmark = [pytest.mark.isa,
              pytest.mark.skipif(not (native.usable("gguf_x16") and native.usable("gguf_q8")),
                                 reason="native gguf_x16 / gguf_q8 kernels unavailable here")]

REPACK = {T.Q4_K: torch.ops.frugallm.gguf_q4k_x16_repack, T.Q6_K: torch.ops.frugallm.gguf_q6k_x16_repack}
QTYPES = pytest.mark.parametrize("qt", list(REPACK), ids=lambda t: t.name)
SHAPES = [(16, 256), (48, 768), (272, 1280)]  # odd block counts, N a multiple of 16
ROWS = 37  # 1..37: every rows-per-pass count (16 per pass at AVX-512, 8 at AVX2) and partial last passes
RTOL = 1e-5  # fp32 rounding, relative to sum |x_q| |w| (tests/quant/test_gguf_q8.py's bound)


def x16_q8(x: torch.Tensor, w16: torch.Tensor, qt: T, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.frugallm.gguf_x16_linear_q8(x, w16, int(qt), n, bias)


def assert_quantized_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y == q8(x) @ w^T (+ bias) up to fp32 rounding (plus the output's bf16 rounding for bf16 y)."""
    xq, wd = q8_dequantize_input(x.float()).double(), w.double()
    ref = xq @ wd.T + (0 if bias is None else bias.double())
    bound = (xq.abs() @ wd.abs().T) * RTOL + (0 if bias is None else bias.double().abs() * 2.0**-23) + 1e-30
    if y.dtype == torch.bfloat16:
        bound = bound + (ref.abs() + bound) * 2.0**-8
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())


def test_isa_variant_matches_the_level() -> None:
    isa = torch.ops.frugallm.gguf_x16_q8_isa()
    if cpu.level() in ("avx512", "avx512bf16"):
        hw = cpu.level() == cpu.hardware_level() and "avx512_vnni" in cpu.flags()
        assert isa == ("avx512vnni" if hw else "avx512bw")
    else:
        assert isa in ("avx2", "avxvnni", "avx512vnni")


@QTYPES
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=lambda v: str(v))
def test_matches_the_quantized_reference_and_one_row(n: int, k: int, x_dtype: torch.dtype, qt: T) -> None:
    """Every r in 1..37: the quantized reference up to fp32 rounding, each row bit-identical to that row alone;
    the stored-block int8 kernel meets the same reference."""
    raw_np = random_blocks(qt, n, k, seed=3 * n + k)
    raw = torch.from_numpy(raw_np)
    w = torch.from_numpy(gguf.quants.dequantize(raw_np, qt))
    w16 = REPACK[qt](raw)
    g = torch.Generator().manual_seed(k)
    # rows with blocks of very different magnitudes (per-32 scales matter), one all-zero block
    x = torch.randn(ROWS, k, generator=g) * torch.rand(ROWS, k // 32, generator=g).repeat_interleave(32, 1) * 4
    x[0, :32] = 0
    x = x.to(x_dtype)
    for bias in (None, torch.randn(n, generator=g)):
        alone = torch.cat([x16_q8(x[i : i + 1], w16, qt, n, bias) for i in range(ROWS)])
        assert alone.dtype == x_dtype and alone.shape == (ROWS, n)
        assert_quantized_close(alone, x, w, bias)
        assert_quantized_close(torch.ops.frugallm.gguf_linear_q8(x, raw, int(qt), n, bias), x, w, bias)
        for r in range(1, ROWS + 1):
            assert torch.equal(x16_q8(x[:r], w16, qt, n, bias), alone[:r]), r


@QTYPES
def test_rows_do_not_depend_on_threads(qt: T, one_thread) -> None:
    n, k = 96, 512
    w16 = REPACK[qt](torch.from_numpy(random_blocks(qt, n, k, seed=9)))
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(10))  # a 16-row pass and a partial one
    single = x16_q8(x, w16, qt, n)
    torch.set_num_threads(2)
    assert torch.equal(x16_q8(x, w16, qt, n), single)


def test_zero_input_gives_the_bias() -> None:
    raw = torch.from_numpy(random_blocks(T.Q6_K, 32, 512, seed=4))
    bias = torch.randn(32)
    y = x16_q8(torch.zeros(3, 512), REPACK[T.Q6_K](raw), T.Q6_K, 32, bias)
    assert torch.equal(y, bias.expand(3, 32))


def test_bad_inputs_are_clear_errors() -> None:
    raw = torch.from_numpy(random_blocks(T.Q4_K, 16, 256, seed=1))
    w16 = REPACK[T.Q4_K](raw)
    with pytest.raises(RuntimeError, match=r"only Q4_K \(12\) and Q6_K"):
        x16_q8(torch.randn(1, 256), w16, T.Q5_K, 16)
    with pytest.raises(RuntimeError, match="bytes"):  # Q6_K's repacked size is not Q4_K's
        x16_q8(torch.randn(1, 256), w16, T.Q6_K, 16)
    with pytest.raises(RuntimeError, match="bytes"):
        x16_q8(torch.randn(1, 512), w16, T.Q4_K, 16)
    with pytest.raises(RuntimeError, match="not a multiple of 256"):
        x16_q8(torch.randn(1, 100), w16, T.Q4_K, 16)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        x16_q8(torch.randn(1, 256).half(), w16, T.Q4_K, 16)
    with pytest.raises(RuntimeError, match="bias"):
        x16_q8(torch.randn(1, 256), w16, T.Q4_K, 16, torch.randn(15))


def test_tiny_q4km_model_in_q8_mode_runs_x16_and_verifies_like_one_row_steps(tiny_models, tiny_ids,
                                                                              monkeypatch) -> None:
    """``weights="stored-q8"`` on a tiny Q4_K_M model (Q4_K and Q6_K): both types stay repacked; a multi-row pass
    (speculative verify) gives each position what its one-row decode step gives (to the rounding of the non-linear
    parts); its logits are as close to the exact model's as those of the stored-layout int8 kernel."""
    kw = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "tie_word_embeddings": True}
    path = str(tiny_models.gguf("qwen2", "Q4_K", overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K"}, **kw))
    x16 = LLM(path, device="cpu", weights="stored-q8")
    layouts = {(s.qtype, s.layout) for m in x16.model.modules() if isinstance(m, GGUFLinear) for s in m.segments}
    assert {(int(T.Q4_K), "x16"), (int(T.Q6_K), "x16")} <= layouts
    monkeypatch.setattr(gl, "repacks", lambda *a: False)
    stored = LLM(path, device="cpu", weights="stored-q8")
    assert all(s.layout == "stored" for m in stored.model.modules() if isinstance(m, GGUFLinear) for s in m.segments)
    prompt, steps = tiny_ids[:8], tiny_ids[8:17]
    n = len(prompt)

    def one_row_steps(llm: LLM) -> torch.Tensor:
        cache = llm.make_cache(1, n + len(steps))
        with torch.inference_mode():
            llm.model(torch.tensor([prompt]), torch.arange(n)[None], cache)
            return torch.cat([llm.model(torch.tensor([[t]]), torch.tensor([[n + i]]), cache)
                              for i, t in enumerate(steps)])

    for llm in (x16, stored):
        llm.model.decode_dtype = torch.float32
    single = one_row_steps(x16)
    cache = x16.make_cache(1, n + len(steps))
    with torch.inference_mode():
        x16.model(torch.tensor([prompt]), torch.arange(n)[None], cache)
        verify = x16.model(torch.tensor([steps]), torch.arange(n, n + len(steps))[None], cache, "all")
    # the int8 linears are row-independent bit for bit (kernel tests above); the rest of a multi-row pass (attention,
    # norms) may round differently, as tests/spec/test_spec_llm.py allows
    torch.testing.assert_close(verify.reshape(single.shape), single, rtol=0, atol=1e-4)
    ref = one_row_steps(stored)
    exact = LLM(path, device="cpu")
    exact.model.decode_dtype = torch.float32
    ex = one_row_steps(exact)
    # A 1-ulp difference upstream can move an activation code by one, so the two int8 paths drift apart through the
    # layers (here ~1 % of the largest logit); each stays as close to the exact fp32 model as the other.
    err_x16, err_stored = (single - ex).abs().max(), (ref - ex).abs().max()
    assert err_x16 <= 1.5 * err_stored + 1e-6 and err_stored <= 0.05 * ex.abs().max()
