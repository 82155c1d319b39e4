"""Decode attention over KIVI chunks in the paged pool (issue 17 item 5): csrc/kivi_attention.cpp against the torch
reference (dequantize, then SDPA), the fused paged kernel's log-sum-exps, and the engine keeping the fused path for
a batch with packed rows. Marked ``isa`` (conftest): `make test` reruns it at FRUGALLM_ISA=avx2."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from engine_runs import run_engine
from frugallm import LLM, SamplingParams, native
from frugallm.engine import paged_cache
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.kv.kivi import KIVI, PagedKIVI

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (native.load("kivi_attention") and native.load("paged_attention")),
                                 reason="native kernels did not build here")]


def packed_case(bits: int, scales: str, hk: int, hq: int, d: int, chunks: list[int], seed: int):
    """Random keys (with a per-channel offset, like Qwen's K bias) and values packed into ``chunks[r]`` chunks per
    row; returns the fp32 codec (its decode is the reference), the chunk bytes, row offsets and queries."""
    g = torch.Generator().manual_seed(seed)
    p = KIVI(bits=bits, group=8, scales=scales)
    codec = PagedKIVI(p, hk, d, torch.float32, "cpu", 8 * hk * d * 2)  # a bf16 pool's blocks of 8 tokens
    n = sum(chunks) * codec.chunk_tokens
    k = torch.randn(hk, n, d, generator=g) * 2 + torch.randn(hk, 1, d, generator=g) * 4
    v = torch.randn(hk, n, d, generator=g)
    kb, vb = codec.encode(k, v)
    offsets = torch.tensor([0, *chunks]).cumsum(0)
    q = torch.randn(len(chunks), hq, d, generator=g)
    return codec, kb, vb, offsets, q


def reference(codec: PagedKIVI, kb, vb, offsets, q):
    """Per row: dequantize its chunks (fp32) and attend with SDPA; its log-sum-exp of scaled scores."""
    outs, lses = [], []
    hq, d = q.shape[1:]
    for r in range(q.shape[0]):
        a, b = int(offsets[r]), int(offsets[r + 1])
        dk, dv = codec.decode(kb[a:b], vb[a:b])
        outs.append(F.scaled_dot_product_attention(q[r][None, :, None], dk[None], dv[None], enable_gqa=True)[0, :, 0])
        s = q[r].view(codec.kv_heads, hq // codec.kv_heads, d) @ dk.transpose(1, 2) * d**-0.5
        lses.append(s.logsumexp(-1).reshape(hq))
    return torch.stack(outs), torch.stack(lses)


def kernel(codec: PagedKIVI, kb, vb, offsets, q):
    p = codec.p
    out, lse = torch.ops.frugallm.kivi_decode_attention(q, kb, vb, offsets, codec.kv_heads, codec.chunk_tokens,
                                                        p.group, p.bits, p.scales == "fp8", q.shape[-1] ** -0.5)
    return (out if codec.rotation is None else out @ codec.rotation), lse


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("scales", ["fp8", "fp16"])
@pytest.mark.parametrize(("hk", "hq", "d", "chunks"), [(2, 14, 64, [3, 1]), (1, 3, 128, [2]), (4, 4, 32, [1, 2, 1])])
def test_kernel_matches_dequantize_and_sdpa(bits, scales, hk, hq, d, chunks) -> None:
    codec, kb, vb, offsets, q = packed_case(bits, scales, hk, hq, d, chunks, seed=bits * 7 + d)
    out, lse = kernel(codec, kb, vb, offsets, q)
    ref_out, ref_lse = reference(codec, kb, vb, offsets, q)
    torch.testing.assert_close(out, ref_out, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(lse, ref_lse, atol=3e-5, rtol=3e-5)


def test_kernel_reads_chunk_rows_with_padding_and_empty_rows() -> None:
    """Chunk rows may carry the rest of their last block (what the pool gather gives); a row without chunks gets
    log-sum-exp -inf (it adds nothing when merged)."""
    codec, kb, vb, offsets, q = packed_case(2, "fp8", 2, 4, 64, [2, 0, 1], seed=3)
    pad = lambda t: torch.cat([t, torch.full((t.shape[0], 100), 255, dtype=torch.uint8)], 1)  # noqa: E731
    out, lse = kernel(codec, pad(kb), pad(vb), offsets, q)
    ref_out, ref_lse = kernel(codec, kb.contiguous(), vb.contiguous(), offsets, q)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert bool((lse[1] == float("-inf")).all())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "q": a["q"].double()}, "q must be a contiguous float32"),
        (lambda a: {**a, "kc": a["kc"][:, :10]}, "k_chunks must be uint8"),
        (lambda a: {**a, "vc": a["vc"][:1]}, "v_chunks must be uint8"),
        (lambda a: {**a, "off": a["off"] + 1}, "offsets out of range"),
        (lambda a: {**a, "off": a["off"][:1]}, "offsets must be"),
        (lambda a: {**a, "bits": 3}, "bits must be 2 or 4"),
    ],
)
def test_kernel_rejects_bad_inputs(change, message) -> None:
    codec, kb, vb, offsets, q = packed_case(2, "fp8", 2, 4, 64, [1, 1], seed=4)
    a = change({"q": q, "kc": kb, "vc": vb, "off": offsets, "bits": 2})
    with pytest.raises(RuntimeError, match=message):
        torch.ops.frugallm.kivi_decode_attention(a["q"], a["kc"], a["vc"], a["off"], 2, codec.chunk_tokens, 8,
                                                 a["bits"], True, 0.125)


def test_paged_kernel_log_sum_exp() -> None:
    g = torch.Generator().manual_seed(5)
    b, hq, hk, d, bs, nb = 3, 6, 2, 64, 8, 4
    k_pool = torch.randn(b * nb + 1, bs, hk, d, generator=g).bfloat16()
    v_pool = torch.randn(b * nb + 1, bs, hk, d, generator=g).bfloat16()
    tables = torch.randperm(b * nb, generator=g).view(b, nb)
    lens = torch.tensor([32, 5, 17])
    q = torch.randn(b, hq, d, generator=g)
    out, lse = torch.ops.frugallm.paged_decode_attention_lse(q, k_pool, v_pool, tables, lens, d**-0.5)
    assert torch.equal(out, torch.ops.frugallm.paged_decode_attention(q, k_pool, v_pool, tables, lens, d**-0.5))
    for r in range(b):
        k = k_pool[tables[r]].reshape(-1, hk, d)[: lens[r]].float().transpose(0, 1)  # [hk, len, d]
        s = q[r].view(hk, hq // hk, d) @ k.transpose(1, 2) * d**-0.5
        torch.testing.assert_close(lse[r], s.logsumexp(-1).reshape(hq), atol=2e-5, rtol=2e-5)


SNAP = "snapkv:budget=0.5,window=8+kivi:bits=2,group=8,residual=8,sinks=2"


def tokens(llm: LLM, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, llm.config.vocab_size) for _ in range(n)]


@pytest.fixture(scope="module")
def bf16_llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="bfloat16", device="cpu")


def test_packed_rows_keep_the_fused_kernel(bf16_llm: LLM, monkeypatch) -> None:
    """A bf16 pool: a batch of packed snapkv+kivi rows and plain rows decodes on the fused kernel (no update()
    gather), gives the torch path's tokens and log-probabilities (to bf16 rounding), and the plain rows the tokens
    they get alone."""
    llm = bf16_llm
    e = LLMEngine(llm, EngineConfig(num_blocks=96, block_size=8, max_num_batched_tokens=512, max_num_seqs=8))
    c = e.packer.codec(KIVI(bits=2, group=8, residual=8, sinks=2))
    n = 2 * (c.sinks + c.residual + 2 * c.chunk_tokens)
    ps = [tokens(llm, n, 30), tokens(llm, n + 21, 31), tokens(llm, 40, 32)]
    kvs = [SNAP, SNAP, "full"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)

    def run(engine: LLMEngine) -> list:
        rids = [engine.add_request(p, params, kv=kv) for p, kv in zip(ps, kvs, strict=True)]
        seqs = [engine.requests[r].seqs[0] for r in rids]
        while engine.has_unfinished_requests():
            engine.step()
            engine.block_manager.check()
        assert engine.block_manager.num_used_blocks == 0
        return [s.output() for s in seqs]

    gathers = []
    update = paged_cache.PagedKVCache.update
    monkeypatch.setattr(paged_cache.PagedKVCache, "update",
                        lambda self, layer, k, v, **kw: (gathers.append(bool(self._packed)), update(self, layer, k, v,
                                                                                                   **kw))[1])
    fused = run(e)
    assert e.packer.num_packed_chunks >= 4
    assert not any(gathers)  # packed rows never went through update()'s dequantize + SDPA
    monkeypatch.setattr(paged_cache, "kernel_available", lambda: False)
    e2 = LLMEngine(llm, EngineConfig(num_blocks=96, block_size=8, max_num_batched_tokens=512, max_num_seqs=8))
    torch_path = run(e2)
    assert any(gathers)
    for mine, theirs in zip(fused, torch_path, strict=True):
        # The torch path rounds dequantized keys / values to bf16, the kernel does not: equal up to that rounding,
        # and tokens only part at a near tie (then the sequences go on from different tokens).
        for t, (a, b) in enumerate(zip(mine.logprobs, theirs.logprobs, strict=True)):
            for tok in a.keys() & b.keys():
                assert a[tok] == pytest.approx(b[tok], abs=0.03)
            x, y = mine.token_ids[t], theirs.token_ids[t]
            if x != y:
                assert abs(a[x] - a.get(y, -1e9)) < 0.03 or abs(b[y] - b.get(x, -1e9)) < 0.03
                break
    alone = run_engine(LLMEngine(llm, EngineConfig(num_blocks=96, block_size=8)), [ps[2]],
                       SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert fused[2].token_ids == alone[0][0].token_ids
