"""Q4_K and Q6_K repacked with 16 rows interleaved (csrc/gguf_x16.cpp, the "x16b" layouts) and their use by
GGUFLinear: the repack is lossless, the linear is dequantize-then-matmul up to fp32 rounding with each row
bit-identical to its one-row pass, dequantizing a repacked segment is the reference's dequantization bit for bit,
and a Q4_K_M model (Q4_K + Q6_K) decodes the same with and without the repack.

Marked ``isa``: ``make test`` reruns this module at ``FRUGALLM_ISA=avx2`` on AVX-512 machines, so each machine
tests every build of the kernel it can execute (AVX512-BF16's vdpbf16ps path, AVX-512 and AVX2 FMA paths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from frugallm import LLM, SamplingParams, cpu, native
from frugallm.errors import FrugalError
from frugallm.quant import gguf_linear as gl
from frugallm.quant import kernels
from frugallm.quant.gguf_linear import GGUFLinear, set_act_quant
from gguf_blocks import random_blocks


@pytest.fixture(autouse=True)
def _x16_on(monkeypatch) -> None:
    """GGUFLinear repacks at AVX-512 and above by default; the tests run the x16 path at every level."""
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "1")


pytestmark = [pytest.mark.isa,
              pytest.mark.skipif(not (native.usable("gguf_x16") and native.usable("gguf_linear")),
                                 reason="native gguf_x16 kernel unavailable here")]

SHAPES = [(16, 256), (48, 768), (272, 1280)]  # (N, K): N multiples of 16, odd numbers of 256-value blocks
ROWS = list(range(1, 38))  # one row, 4-row passes, 16-row wide passes and partial last passes (16 + 16 + 5)
# type -> (repack, unpack, repacked bytes per 16 rows per 256-value block)
X16 = {T.Q4_K: (torch.ops.frugallm.gguf_q4k_x16_repack, torch.ops.frugallm.gguf_q4k_x16_unpack, 2304),
       T.Q6_K: (torch.ops.frugallm.gguf_q6k_x16_repack, torch.ops.frugallm.gguf_q6k_x16_unpack, 3360)}
QTYPES = pytest.mark.parametrize("qt", list(X16), ids=lambda t: t.name)


def dequantized(raw: np.ndarray, qt: T = T.Q4_K) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qt))


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y == x @ w^T (+ bias) up to fp32 rounding of the sums (relative to sum |x||w|), plus one bf16 rounding of
    the output for bf16 y (as tests/loading/test_gguf_multirow.py bounds the stored-block kernel)."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (0 if bias is None else bias.double())
    bound = (xd.abs() @ wd.abs().T) * 1e-5 + (0 if bias is None else bias.double().abs() * 2.0**-23) + 1e-30
    if y.dtype == torch.bfloat16:
        bound = bound + (ref.abs() + bound) * 2.0**-8
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())


@QTYPES
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=lambda v: str(v))
def test_repack_is_lossless_and_dequantizes_bit_for_bit(n: int, k: int, qt: T) -> None:
    repack, unpack, block = X16[qt]
    raw_np = random_blocks(qt, n, k, seed=n + k)
    raw = torch.from_numpy(raw_np)
    w16 = repack(raw)
    assert w16.shape == (n // 16, k // 256 * block) and w16.numel() == raw.numel()  # the same bytes
    assert not torch.equal(w16.reshape(raw.shape), raw)  # really interleaved
    assert torch.equal(unpack(w16, n, None), raw)
    idx = torch.tensor([n - 1, 0, 17 % n, n - 1])
    assert torch.equal(unpack(w16, n, idx), raw[idx])
    # GGUFLinear's dequantize of the repacked segment: the reference's numbers exactly.
    lin = GGUFLinear([(int(qt), raw, n)], k)
    assert lin.segments[0].layout == "x16" and lin.raw(0).shape == w16.shape
    assert torch.equal(lin.dequantize(torch.float32), dequantized(raw_np, qt))
    assert torch.equal(lin.dequantize_rows(idx), dequantized(raw_np, qt)[idx])
    assert torch.equal(lin.dequantize(torch.bfloat16), dequantized(raw_np, qt).to(torch.bfloat16))


def test_q6k_repack_round_trips_every_code() -> None:
    """Every 6-bit code at every position of a Q6_K block (ql / qh bit placement) survives the repack: 16 rows
    whose codes are (row + value) % 64 over one block, unpacked bit for bit."""
    raw = torch.from_numpy(random_blocks(T.Q6_K, 16, 256, seed=3))
    codes = (torch.arange(16)[:, None] + torch.arange(256)[None]) % 64  # [16 rows, 256 values]
    v = torch.arange(256)
    h, qd, lo = v // 128, (v % 128) // 32, v % 32
    ql, qh = torch.zeros(16, 128, dtype=torch.int64), torch.zeros(16, 64, dtype=torch.int64)
    ql.index_add_(1, 64 * h + 32 * (qd % 2) + lo, (codes & 15) << torch.where(qd < 2, 0, 4))
    qh.index_add_(1, 32 * h + lo, (codes >> 4) << (2 * qd))
    raw[:, :128], raw[:, 128:192] = ql.to(torch.uint8), qh.to(torch.uint8)
    ref = dequantized(raw.numpy(), T.Q6_K)
    d = torch.from_numpy(raw[:, 208:210].numpy().copy().view(np.float16).astype(np.float32))  # [16, 1]
    sc = raw[:, 192:208].view(torch.int8).float().repeat_interleave(16, 1)
    torch.testing.assert_close(ref, d * sc * (codes - 32).float(), rtol=0, atol=0)  # codes placed as meant
    w16 = torch.ops.frugallm.gguf_q6k_x16_repack(raw)
    assert torch.equal(torch.ops.frugallm.gguf_q6k_x16_unpack(w16, 16, None), raw)


@QTYPES
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=lambda v: str(v))
def test_linear_matches_dequantize_then_matmul_and_one_row(n: int, k: int, x_dtype: torch.dtype, qt: T) -> None:
    """Every r in 1..17: dequantize-then-matmul up to fp32 rounding, each row bit-identical to that row alone."""
    raw_np = random_blocks(qt, n, k, seed=2 * n + k)
    raw, w = torch.from_numpy(raw_np), dequantized(raw_np, qt)
    w16 = X16[qt][0](raw)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(max(ROWS), k, generator=g).to(x_dtype)
    for bias in (None, torch.randn(n, generator=g)):
        alone = torch.cat([torch.ops.frugallm.gguf_x16_linear(x[i : i + 1], w16, int(qt), n, bias)
                           for i in range(max(ROWS))])
        assert alone.dtype == x_dtype
        assert_close(alone, x.float(), w, bias)
        for r in ROWS:
            y = torch.ops.frugallm.gguf_x16_linear(x[:r], w16, int(qt), n, bias)
            assert y.shape == (r, n) and torch.equal(y, alone[:r]), r
        if qt == T.Q4_K:  # the Q4_K-only op is the same kernel
            assert torch.equal(torch.ops.frugallm.gguf_q4k_x16_linear(x[:5], w16, int(qt), n, bias), alone[:5])


@QTYPES
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_do_not_depend_on_threads(x_dtype: torch.dtype, qt: T, one_thread) -> None:
    n, k = 96, 512
    w16 = X16[qt][0](torch.from_numpy(random_blocks(qt, n, k, seed=9)))
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(10)).to(x_dtype)
    single = torch.ops.frugallm.gguf_x16_linear(x, w16, int(qt), n, None)
    torch.set_num_threads(2)
    assert torch.equal(torch.ops.frugallm.gguf_x16_linear(x, w16, int(qt), n, None), single)


def test_bad_inputs_are_clear_errors() -> None:
    raw = torch.from_numpy(random_blocks(T.Q4_K, 16, 256, seed=1))
    w16 = torch.ops.frugallm.gguf_q4k_x16_repack(raw)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.frugallm.gguf_q4k_x16_repack(raw[:8])
    with pytest.raises(RuntimeError, match="only Q4_K"):
        torch.ops.frugallm.gguf_q4k_x16_linear(torch.randn(1, 256), w16, int(T.Q6_K), 16, None)
    with pytest.raises(RuntimeError, match="bytes"):
        torch.ops.frugallm.gguf_q4k_x16_linear(torch.randn(1, 512), w16, int(T.Q4_K), 16, None)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.frugallm.gguf_q4k_x16_unpack(w16, 16, torch.tensor([16]))
    with pytest.raises(RuntimeError, match=r"only Q4_K \(12\) and Q6_K"):
        torch.ops.frugallm.gguf_x16_linear(torch.randn(1, 256), w16, int(T.Q5_K), 16, None)
    raw6 = torch.from_numpy(random_blocks(T.Q6_K, 16, 256, seed=2))
    w6 = torch.ops.frugallm.gguf_q6k_x16_repack(raw6)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.frugallm.gguf_q6k_x16_repack(raw6[:8])
    with pytest.raises(RuntimeError, match="Q6_K blocks"):
        torch.ops.frugallm.gguf_q6k_x16_repack(raw6[:, :200])
    with pytest.raises(RuntimeError, match="bytes"):  # Q4_K's repacked size is not Q6_K's
        torch.ops.frugallm.gguf_x16_linear(torch.randn(1, 256), w6, int(T.Q4_K), 16, None)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.frugallm.gguf_q6k_x16_unpack(w6, 16, torch.tensor([-1]))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gguf_linear_repacks_q4k_and_q6k_segments_of_16k_rows(x_dtype: torch.dtype) -> None:
    """A fused Q4_K (x16) + Q6_K (x16) + Q4_K-of-40-rows (stays stored) + Q5_K linear: its few-row passes (forward
    and decode_fn) equal the x16 / stored-block kernels per segment; prefill-size passes dequantize; q8 mode runs the
    x16 segments' int8 kernel and the stored-block one on the rest."""
    k = 512
    segs_np = [(T.Q4_K, random_blocks(T.Q4_K, 48, k, seed=1), 48), (T.Q6_K, random_blocks(T.Q6_K, 32, k, seed=2), 32),
               (T.Q4_K, random_blocks(T.Q4_K, 40, k, seed=3), 40), (T.Q5_K, random_blocks(T.Q5_K, 16, k, seed=6), 16)]
    segs: list[tuple[int, Any, int]] = [(int(t), torch.from_numpy(r), n) for t, r, n in segs_np]
    bias = torch.randn(136, generator=torch.Generator().manual_seed(4))
    lin = GGUFLinear(segs, k, bias)
    assert [s.layout for s in lin.segments] == ["x16", "x16", "stored", "stored"]
    assert "Q4_Kx48(x16)" in lin.extra_repr() and "Q6_Kx32(x16)" in lin.extra_repr()
    w = torch.cat([dequantized(r, t) for t, r, _ in segs_np])
    x = torch.randn(lin.few_rows_limit(x_dtype) + 3, k, generator=torch.Generator().manual_seed(5)).to(x_dtype)
    few = x[:5]
    y = lin(few)
    assert_close(y, few.float(), w, bias)
    assert torch.equal(y[:, :48], torch.ops.frugallm.gguf_q4k_x16_linear(few, lin.raw(0), int(T.Q4_K), 48, bias[:48]))
    assert torch.equal(y[:, 48:80], torch.ops.frugallm.gguf_x16_linear(few, lin.raw(1), int(T.Q6_K), 32, bias[48:80]))
    assert torch.equal(y[:, 80:], torch.cat([torch.ops.frugallm.gguf_linear(few, segs[i][1], segs[i][0], segs[i][2],
                                                                           bias[lo:hi])
                                             for i, (lo, hi) in ((2, (80, 120)), (3, (120, 136)))], 1))
    assert torch.equal(lin.decode_fn(x_dtype, torch.device("cpu"))(few), y)
    big = lin(x)  # prefill: dequantize (unpacked blocks) then F.linear
    ref = torch.nn.functional.linear(x, lin.dequantize(x_dtype), bias.to(x_dtype))
    assert torch.equal(big, ref)
    # int8 activations: Q4_K / Q6_K stay repacked (gguf_x16_linear_q8), the rest reads the stored blocks
    # (gguf_linear_q8), whether built in q8 mode or switched to it.
    lq8 = GGUFLinear(segs, k, bias, act_quant="q8")
    assert [s.layout for s in lq8.segments] == ["x16", "x16", "stored", "stored"]
    model = torch.nn.Sequential(lin)
    assert set_act_quant(model, "q8") == 1
    assert [s.layout for s in lin.segments] == ["x16", "x16", "stored", "stored"]
    y8 = lin(few)
    assert torch.equal(lq8(few), y8) and torch.equal(lin.decode_fn(x_dtype, torch.device("cpu"))(few), y8)
    q8_x16, q8 = torch.ops.frugallm.gguf_x16_linear_q8, torch.ops.frugallm.gguf_linear_q8
    assert torch.equal(y8[:, :48], q8_x16(few, lin.raw(0), int(T.Q4_K), 48, bias[:48]))
    assert torch.equal(y8[:, 48:80], q8_x16(few, lin.raw(1), int(T.Q6_K), 32, bias[48:80]))
    assert torch.equal(y8[:, 80:120], q8(few, segs[2][1], int(T.Q4_K), 40, bias[80:120]))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_few_rows_cap_follows_the_layout_and_dtype(x_dtype: torch.dtype) -> None:
    """A linear whose segments are all x16 takes passes of up to GGUF_FP32_MAX_ROWS (fp32 x) or
    GGUF_X16_BF16_MAX_ROWS (bf16 x) rows on the kernels, each row bit-identical to its one-row pass; one row more
    dequantizes then multiplies; q8 mode keeps NATIVE_QUANT_MAX_ROWS."""
    k = 512
    segs = [(int(T.Q4_K), torch.from_numpy(random_blocks(T.Q4_K, 48, k, seed=11)), 48),
            (int(T.Q6_K), torch.from_numpy(random_blocks(T.Q6_K, 32, k, seed=12)), 32)]
    bias = torch.randn(80, generator=torch.Generator().manual_seed(13))
    lin = GGUFLinear(segs, k, bias)
    assert [s.layout for s in lin.segments] == ["x16", "x16"]
    cap = lin.few_rows_limit(x_dtype)
    assert cap == (kernels.GGUF_FP32_MAX_ROWS if x_dtype == torch.float32 else kernels.GGUF_X16_BF16_MAX_ROWS)
    assert cap > kernels.NATIVE_QUANT_MAX_ROWS
    assert GGUFLinear(segs, k, bias, act_quant="q8").few_rows_limit(x_dtype) == kernels.NATIVE_QUANT_MAX_ROWS
    x = torch.randn(cap + 1, k, generator=torch.Generator().manual_seed(14)).to(x_dtype)
    fn = lin.decode_fn(x_dtype, torch.device("cpu"))
    steps = torch.cat([fn(x[i : i + 1]) for i in range(cap)])
    assert torch.equal(fn(x[:cap]), steps) and torch.equal(lin(x[:cap]), steps)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.dequantize(x_dtype), bias.to(x_dtype)))


def test_tiny_q4k_model_decodes_the_same_without_the_repack(tiny_models, tiny_ids, monkeypatch) -> None:
    """A tiny Q4_K_M model (qwen2, tied head; Q4_K and Q6_K) as stored, repacked vs not: fp32 decode logits equal
    to fp32 rounding and the same greedy tokens (single stream and batched); in the default decode dtype (bf16 on
    AVX512-BF16) the logits agree to bf16 precision (a random tiny model's near-ties may then pick another greedy
    token)."""
    kw = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "tie_word_embeddings": True}
    path = str(tiny_models.gguf("qwen2", "Q4_K", overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K"}, **kw))
    x16 = LLM(path, device="cpu")
    layouts = {(s.qtype, s.layout) for m in x16.model.modules() if isinstance(m, GGUFLinear) for s in m.segments}
    assert {(int(T.Q4_K), "x16"), (int(T.Q6_K), "x16")} <= layouts
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
    assert x16.generate(prompts[0], params)[0].token_ids == stored.generate(prompts[0], params)[0].token_ids
    got, want = x16.generate(prompts, params), stored.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def _mapped_kib(path: Path) -> int:
    """This process's resident KiB of ``path``'s mappings (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
            inside = len(parts) >= 6 and parts[5] == str(path)
        elif inside and parts[0] == "Rss:":
            total += int(parts[1])
    return total


def test_repack_releases_file_pages_but_never_changes_the_source(tmp_path) -> None:
    """A segment repacked from a read-only memmap unmaps the file's pages (RSS counts the weights once); reading
    the memmap again still gives the file's bytes, and an in-memory source is left exactly as it was."""
    n, k = 64, 4096
    raw_np = random_blocks(T.Q4_K, n, k, seed=11)
    path = tmp_path / "w.bin"
    raw_np.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r").reshape(raw_np.shape)
    lin = GGUFLinear([(int(T.Q4_K), mm, n)], k)
    assert lin.segments[0].layout == "x16"
    if Path("/proc/self/smaps").is_file():
        assert _mapped_kib(path) == 0, "the file's pages are still mapped after the repack"
    assert np.array_equal(np.asarray(mm), raw_np)  # the released pages read back from the file
    assert torch.equal(lin.dequantize(), dequantized(raw_np))
    mem = raw_np.copy()
    GGUFLinear([(int(T.Q4_K), mem, n)], k)
    assert np.array_equal(mem, raw_np)  # anonymous memory is never released
    ro = raw_np.copy()
    ro.flags.writeable = False
    GGUFLinear([(int(T.Q4_K), ro, n)], k)
    assert np.array_equal(ro, raw_np)


def test_env_switch_and_default(monkeypatch) -> None:
    """Default: repacked at AVX-512 and above; at AVX2 Q4_K, and Q6_K only with int8 activations (its exact x16
    kernel is slower there at one row); 0 / 1 force it, type names force it for those types only."""
    raw = torch.from_numpy(random_blocks(T.Q4_K, 32, 256, seed=12))
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "0")
    assert GGUFLinear([(int(T.Q4_K), raw, 32)], 256).segments[0].layout == "stored"
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "1")
    assert GGUFLinear([(int(T.Q4_K), raw, 32)], 256).segments[0].layout == "x16"
    raw6 = torch.from_numpy(random_blocks(T.Q6_K, 32, 256, seed=13))
    segs = [(int(T.Q4_K), raw, 32), (int(T.Q6_K), raw6, 32)]
    for flag, want in (("Q4_K", ["x16", "stored"]), ("q6_k", ["stored", "x16"]), ("Q4_K,Q6_K", ["x16", "x16"])):
        monkeypatch.setenv("FRUGALLM_GGUF_X16", flag)
        assert [s.layout for s in GGUFLinear(segs, 256).segments] == want, flag
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "Q5_K")
    with pytest.raises(FrugalError, match="FRUGALLM_GGUF_X16='Q5_K'"):
        GGUFLinear(segs, 256)
    monkeypatch.delenv("FRUGALLM_GGUF_X16")
    want = "x16" if cpu.at_least("avx512") else "stored"
    assert [s.layout for s in GGUFLinear(segs, 256).segments] == ["x16", want]
    assert [s.layout for s in GGUFLinear(segs, 256, act_quant="q8").segments] == ["x16", "x16"]
