"""GGUF linears with int8 activations (csrc/gguf_q8.cpp, ``weights="stored-q8"``): llama.cpp's arithmetic, opt-in.

The kernel is checked against a torch reference that quantizes x the same way (``q8_quantize``: per 32 values,
scale max|x| / 127, round half to even) and multiplies the dequantized operands: equal up to fp32 rounding. Against
the exact kernel it differs by at most the activation quantization error. The module runs under every ISA level the
machine executes (conftest's ISA_MODULES: `make test` reruns it with FRUGALLM_ISA=avx2).
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from frugallm import LLM, SamplingParams, cpu, native
from frugallm.errors import FrugalError
from frugallm.loading import choose_weights, load_model
from frugallm.quant.gguf_linear import (
    Q8_NOTE,
    Q8_TYPES,
    GGUFLinear,
    q8_dequantize_input,
    q8_quantize,
    set_act_quant,
)
from gguf_blocks import random_blocks

pytestmark = pytest.mark.skipif(not (native.usable("gguf_q8") and native.usable("gguf_linear")),
                                reason="native gguf kernels unavailable here")

TYPES = sorted(Q8_TYPES)
RTOL = 1e-5  # fp32 rounding, relative to sum |x_q| |w|


def dequant(raw: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype))


def q8_op(x: torch.Tensor, raw: np.ndarray | torch.Tensor, qtype: int, n: int, bias=None) -> torch.Tensor:
    w = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(raw)
    return torch.ops.frugallm.gguf_linear_q8(x, w, int(qtype), n, bias)


def test_isa_variant_matches_the_level() -> None:
    """The integer dot product compiled in is the one this ISA level (FRUGALLM_ISA included) allows."""
    isa = torch.ops.frugallm.gguf_q8_isa()
    if cpu.level() != cpu.hardware_level():  # capped: a generic -march of that level (x86-64-v3 / v4: no VNNI)
        assert isa == "avx2"
    elif {"avx512_vnni", "avx512vl"} <= cpu.flags():
        assert isa == "avx512vnni"
    else:
        assert isa == ("avxvnni" if "avx_vnni" in cpu.flags() else "avx2")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 1), (1, 3), (19, 2)], ids=lambda s: f"n{s[0]}-b{s[1]}")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_the_quantized_reference(qtype: T, shape: tuple[int, int], x_dtype: torch.dtype) -> None:
    n, blocks = shape
    k = gguf.GGML_QUANT_SIZES[qtype][0] * blocks
    raw = random_blocks(qtype, n, k, seed=n + blocks)
    w = dequant(raw, qtype).double()
    bias = torch.randn(n)
    for rows in range(1, 10):
        x = (torch.randn(rows, k) * torch.rand(rows, k // 32).repeat_interleave(32, 1) * 4).to(x_dtype)
        xq = q8_dequantize_input(x.float()).double()
        for b in (None, bias):
            y = q8_op(x, raw, qtype, n, b)
            assert y.shape == (rows, n) and y.dtype == x_dtype
            ref = xq @ w.T + (0 if b is None else b.double())
            bound = (xq.abs() @ w.abs().T) * RTOL + (0 if b is None else b.double().abs() * 2.0**-23) + 1e-30
            if x_dtype == torch.bfloat16:  # the output's one rounding to bf16
                bound = bound + (ref.abs() + bound) * 2.0**-8
            assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_within_the_activation_error_of_the_exact_kernel(qtype: T) -> None:
    """|y_q8 - y_exact| <= sum |x - x_q| |w| (+ fp32 rounding), and the bound is not vacuous: the error is real."""
    k = gguf.GGML_QUANT_SIZES[qtype][0] * 4
    raw = random_blocks(qtype, 64, k, seed=3)
    w = dequant(raw, qtype).double()
    x = torch.randn(5, k)
    y, exact = q8_op(x, raw, qtype, 64), torch.ops.frugallm.gguf_linear(x, torch.from_numpy(raw), int(qtype), 64, None)
    err = (x.double() - q8_dequantize_input(x).double()).abs()
    bound = err @ w.abs().T + (x.double().abs() @ w.abs().T) * 2 * RTOL
    diff = (y.double() - exact.double()).abs()
    assert (diff <= bound).all()
    assert diff.max() > 0  # int8 activations are not exact


def test_rounding_is_half_to_even_and_zero_blocks_stay_zero() -> None:
    """One-hot Q8_0 rows (d = 1) read back the activation codes: max|x| = 127 gives scale 1, so x = 2.5 -> 2,
    3.5 -> 4, -2.5 -> -2 (ties to even); an all-zero block has scale 0 and gives 0, not NaN."""
    k = 64
    raw = np.zeros((k, 34 * (k // 32)), np.uint8)
    for j in range(k):
        blk, i = divmod(j, 32)
        raw[j, 34 * blk : 34 * blk + 2] = np.array([1.0], np.float16).view(np.uint8)
        raw[j, 34 * blk + 2 + i] = 1
    x = torch.zeros(1, k)
    x[0, :6] = torch.tensor([127.0, 2.5, 3.5, -2.5, 0.5, -127.0])
    y = q8_op(x, raw, T.Q8_0, k)
    assert y[0, :6].tolist() == [127.0, 2.0, 4.0, -2.0, 0.0, -127.0]
    assert torch.equal(y[0, 6:], torch.zeros(k - 6))
    q, d = q8_quantize(x)
    assert q[0, :6].tolist() == [127, 2, 4, -2, 0, -127] and d[0].tolist() == [1.0, 0.0]


def test_bad_input_is_the_exact_ops_error() -> None:
    raw = torch.from_numpy(random_blocks(T.Q4_K, 8, 256))
    x = torch.randn(1, 256)
    for bad_w in (raw[:, :-1].contiguous(), raw[:7]):
        msgs = []
        for op in (torch.ops.frugallm.gguf_linear, torch.ops.frugallm.gguf_linear_q8):
            with pytest.raises(RuntimeError, match="bytes per row|rows but out_features") as e:
                op(x, bad_w, int(T.Q4_K), 8, None)
            msgs.append(str(e.value).splitlines()[0])
        assert msgs[0] == msgs[1]
    with pytest.raises(RuntimeError, match="unsupported GGUF qtype 10 for int8 activations"):
        q8_op(x, torch.from_numpy(random_blocks(T.Q2_K, 8, 256)), T.Q2_K, 8)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 or bfloat16"):
        q8_op(x.half(), raw, T.Q4_K, 8)
    with pytest.raises(FrugalError, match="unknown act_quant"):
        GGUFLinear([(int(T.Q4_K), random_blocks(T.Q4_K, 8, 256), 8)], 256, act_quant="q4")


def test_module_uses_int8_for_few_rows_only() -> None:
    """A fused Q4_K + Q6_K + Q2_K linear: Q8_TYPES segments take the int8 op for decode-sized passes, the Q2_K
    segment and larger passes stay exact; set_act_quant(max_rows=...) widens the int8 passes."""
    k = 256
    segs = [(int(t), random_blocks(t, n, k, seed=n), n) for t, n in ((T.Q4_K, 24), (T.Q6_K, 8), (T.Q2_K, 5))]
    bias = torch.randn(37)
    exact = GGUFLinear(segs, k, bias)
    q8 = GGUFLinear(segs, k, bias, act_quant="q8")
    assert "act_quant=q8" in repr(q8)
    x = torch.randn(3, k)
    want = torch.cat([q8_op(x, segs[0][1], T.Q4_K, 24, bias[:24]), q8_op(x, segs[1][1], T.Q6_K, 8, bias[24:32]),
                      torch.ops.frugallm.gguf_linear(x, torch.from_numpy(segs[2][1]), int(T.Q2_K), 5, bias[32:])], 1)
    assert torch.equal(q8(x), want)
    assert torch.equal(q8.decode_fn(torch.float32, torch.device("cpu"))(x), want)
    assert not torch.equal(exact(x), want)
    big = torch.randn(40, k)  # prefill-sized: dequantize-then-matmul, exact
    assert torch.equal(q8(big), exact(big))
    assert set_act_quant(q8, "q8", max_rows=1024) == 1
    assert not torch.equal(q8(big), exact(big))
    one = GGUFLinear(segs[:1], k, act_quant="q8")  # one segment: decode_fn calls the op directly
    assert torch.equal(one.decode_fn(torch.float32, torch.device("cpu"))(x), q8_op(x, segs[0][1], T.Q4_K, 24))


# ------------------------------------------------------------------------------------------- model level

KQ = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
CASES: list[tuple[str, str, str, dict[str, Any], dict[str, Any]]] = [
    ("llama-tied-Q4_1", "llama", "Q4_1", {"tie_word_embeddings": True}, {}),
    ("qwen2-tied-Q4_K_M", "qwen2", "Q4_K", {**KQ, "tie_word_embeddings": True},
     {"overrides": {"attn_v": "Q6_K", "ffn_down": "Q6_K"}}),
]


def test_weights_mode_choice(tiny_models) -> None:
    path, cpu_dev = tiny_models.gguf("llama", "Q4_0"), torch.device("cpu")
    mode, why = choose_weights(path, "stored-q8", "auto", cpu_dev)
    assert mode == "stored-q8" and Q8_NOTE in why
    assert choose_weights(path, "stored-q8", "float32", cpu_dev)[0] == "stored-q8"
    assert choose_weights(path, "auto", "auto", cpu_dev)[0] == "stored"  # the default stays exact
    with pytest.raises(FrugalError, match="weights='stored-q8' cannot be used here: dtype=bfloat16"):
        choose_weights(path, "stored-q8", "bfloat16", cpu_dev)
    with pytest.raises(FrugalError, match="stored-q8"):
        choose_weights(path, "int8-acts", "auto", cpu_dev)
    loaded = load_model(path, torch.float32, cpu_dev, weights="stored-q8")
    linears = [m for m in loaded.model.modules() if isinstance(m, GGUFLinear)]
    assert linears and all(m.act_quant == "q8" for m in linears)
    assert loaded.source_info["weights"] == "stored-q8"


@pytest.mark.parametrize(("arch", "typ", "hf_kw", "gguf_kw"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_model_decode_close_to_exact(tiny_models, tiny_ids, arch, typ, hf_kw, gguf_kw) -> None:
    """A tiny GGUF model decoding with int8 activations: logits of every teacher-forced step within TOL of the
    largest |logit| of the exact stored run, and each token greedy generation picks is, under the exact model's
    logits, within 2 TOL of the best (a random tiny model has near ties, so exact token equality is not a given)."""
    tol = 0.06  # measured 1.6 % (llama Q4_1) and 3.0 % (qwen2 Q4_K_M): random 2-layer models amplify the noise
    path = str(tiny_models.gguf(arch, typ, **gguf_kw, **hf_kw))
    exact, q8 = LLM(path, device="cpu"), LLM(path, device="cpu", weights="stored-q8")
    assert exact.weights == "stored" and (q8.weights, q8.dtype) == ("stored-q8", torch.float32)
    # the q8 kernel reads fp32 activations: int8 codes of bf16-rounded ones lose more
    assert q8.model.decode_dtype in (None, torch.float32)
    linears = [m for m in q8.model.modules() if isinstance(m, GGUFLinear)]
    assert linears and all(m.act_quant == "q8" for m in linears)
    for llm in (exact, q8):
        llm.model.decode_dtype = torch.float32
    prompt, steps = tiny_ids[:12], tiny_ids[12:28]

    def decode_logits(llm: LLM) -> torch.Tensor:
        cache = llm.make_cache(1, len(prompt) + len(steps))
        with torch.inference_mode():
            llm.model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
            return torch.cat([llm.model(torch.tensor([[t]]), torch.tensor([[len(prompt) + i]]), cache)
                              for i, t in enumerate(steps)])

    a, b = decode_logits(exact), decode_logits(q8)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() <= tol * a.abs().max()
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    for text in ("Hello", "The cat sat", "1 2 3"):
        out = q8.generate(text, p)[0]
        ids = out.prompt_token_ids + out.token_ids
        ref = exact.score(ids)[len(out.prompt_token_ids) - 1 : -1]  # exact logits where each token was chosen
        chosen = ref.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert (chosen >= ref.max(-1).values - 2 * tol * ref.abs().max()).all()


@pytest.mark.slow
def test_default_model_perplexity_within_half_a_percent() -> None:
    """SmolLM2-135M Q4_1 on the built-in corpus, every position through the int8 kernel (max_rows lifted, as
    llama.cpp's perplexity computes) with fp32 activations: within 0.5 % of the exact run's perplexity (measured
    +0.35 %), and of llama.cpp's on the same windows where llama-cpp-python is installed (measured +0.03 %).
    bf16 activations quantized again to int8 lose more (measured +0.55 % over exact bf16): stored-q8 decodes fp32."""
    import math

    from frugallm.corpus import builtin_corpus
    from frugallm.lab.quality import corpus_windows, perplexity, window_logprobs
    from frugallm.loading import resolve_model_path

    llm = LLM("default", device="cpu")
    llm.model.prefill_dtype = torch.float32
    wins = corpus_windows(llm.tokenizer, builtin_corpus(), 4, 256)
    exact, _, _ = perplexity(window_logprobs(llm.score, wins), wins)
    assert set_act_quant(llm.model, "q8", max_rows=4096) > 0
    q8, _, _ = perplexity(window_logprobs(llm.score, wins), wins)
    assert q8 != exact
    assert abs(q8 / exact - 1) <= 0.005, (q8, exact)
    try:
        import llama_cpp
    except ImportError:
        return
    ref = llama_cpp.Llama(model_path=str(resolve_model_path("default")), n_ctx=264, n_threads=2, n_batch=512,
                          logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for w in wins:
        ref.reset()
        ref.eval(w)
        logits = torch.tensor(np.asarray(ref.scores[: len(w)]), dtype=torch.float64)
        nll -= float(torch.log_softmax(logits, -1)[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
        count += len(w) - 1
    llama_ppl = math.exp(nll / count)
    assert abs(q8 / llama_ppl - 1) <= 0.005, (q8, llama_ppl)
