"""The fused paged decode-attention kernel (csrc/paged_attention.cpp) and how the paged cache uses it."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine_runs import prompts_for, run_engine
from frugallm import LLM, SamplingParams, cpu, native
from frugallm.config import ModelConfig
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.engine.paged_cache import PagedKVCache, pool_dtype
from frugallm.model.llama import Transformer

needs_kernel = pytest.mark.skipif(not native.load("paged_attention"), reason="native kernel did not build here")


def reference(q, k_pool, v_pool, tables, lens):
    """Gather each row's blocks and run fp32 SDPA with a length mask: what the kernel must equal."""
    b, nb = tables.shape
    bs, hk, d = k_pool.shape[1:]
    k = k_pool.float()[tables.reshape(-1)].view(b, nb * bs, hk, d).transpose(1, 2)
    v = v_pool.float()[tables.reshape(-1)].view(b, nb * bs, hk, d).transpose(1, 2)
    mask = torch.arange(nb * bs)[None, :] < lens[:, None]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None], enable_gqa=True)[:, :, 0]


def random_case(b, hq, hk, d, bs, max_len, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lens = torch.tensor([rng.randint(1, max_len) for _ in range(b)])
    lens[0] = max_len
    nb = -(-max_len // bs)
    num_blocks = b * nb + 3
    tables = torch.randperm(num_blocks, generator=g)[: b * nb].view(b, nb).contiguous()  # scattered blocks
    q = torch.randn(b, hq, d, generator=g)
    k_pool = (torch.randn(num_blocks, bs, hk, d, generator=g) * 2).to(dtype)
    v_pool = torch.randn(num_blocks, bs, hk, d, generator=g).to(dtype)
    return q, k_pool, v_pool, tables, lens


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("b", "hq", "hk", "d", "bs", "max_len"),
    [
        (3, 4, 4, 64, 16, 37),  # MHA
        (5, 9, 3, 64, 16, 200),  # SmolLM2's GQA shape
        (2, 8, 2, 128, 8, 61),  # head_dim 128
        (4, 6, 2, 80, 16, 33),  # a head size without a specialised path
        (1, 2, 1, 7, 4, 1),  # odd head size, one key
        (2, 3, 3, 16, 1, 9),  # block size 1
    ],
)
def test_kernel_matches_gather_and_sdpa(b, hq, hk, d, bs, max_len, dtype) -> None:
    q, k_pool, v_pool, tables, lens = random_case(b, hq, hk, d, bs, max_len, dtype, seed=b * 31 + d)
    got = torch.ops.frugallm.paged_decode_attention(q, k_pool, v_pool, tables, lens, d**-0.5)
    assert got.shape == (b, hq, d) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(q, k_pool, v_pool, tables, lens),
                               atol=2e-5, rtol=2e-5)


@needs_kernel
def test_kernel_ignores_slots_past_the_length() -> None:
    q, k_pool, v_pool, tables, lens = random_case(3, 4, 2, 32, 8, 20, torch.bfloat16, seed=1)
    before = torch.ops.frugallm.paged_decode_attention(q, k_pool, v_pool, tables, lens, 0.2)
    for row in range(3):  # poison every slot after each row's length (same block tables)
        for s in range(int(lens[row]), tables.shape[1] * 8):
            k_pool[tables[row, s // 8], s % 8] = float("nan")
            v_pool[tables[row, s // 8], s % 8] = float("inf")
    assert torch.equal(torch.ops.frugallm.paged_decode_attention(q, k_pool, v_pool, tables, lens, 0.2), before)


@needs_kernel
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "q": a["q"].half()}, "q must be a contiguous float32"),
        (lambda a: {**a, "v_pool": a["v_pool"].float()}, "k_pool and v_pool must be contiguous"),
        (lambda a: {**a, "block_tables": a["block_tables"].int()}, "block_tables must be a contiguous int64"),
        (lambda a: {**a, "context_lens": a["context_lens"] + 100}, "context length out of the block table"),
        (lambda a: {**a, "context_lens": a["context_lens"] * 0}, "context length out of the block table"),
        (lambda a: {**a, "q": a["q"][:, :3].contiguous()}, "q heads/head_dim do not match the pool"),
        (lambda a: {**a, "context_lens": a["context_lens"][:1]}, "batch sizes differ"),
    ],
)
def test_kernel_rejects_bad_inputs(change, message) -> None:
    q, k_pool, v_pool, tables, lens = random_case(2, 4, 2, 16, 4, 10, torch.bfloat16, seed=2)
    args = change({"q": q, "k_pool": k_pool, "v_pool": v_pool, "block_tables": tables, "context_lens": lens})
    with pytest.raises(RuntimeError, match=message):
        torch.ops.frugallm.paged_decode_attention(
            args["q"], args["k_pool"], args["v_pool"], args["block_tables"], args["context_lens"], 0.25
        )


def test_build_failure_is_reported_not_raised(monkeypatch, caplog, tmp_path) -> None:
    monkeypatch.setenv("FRUGALLM_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError):
        native._build("paged_attention", "false")  # a "compiler" that always fails
    assert not list((tmp_path / "native").glob("*.so"))
    monkeypatch.setattr(native, "_loaded", set())
    monkeypatch.setattr(native, "_failed", set())
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setattr(native.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    with caplog.at_level(logging.WARNING, logger="frugallm.native"):
        assert native.load("paged_attention") is False
        assert native.load("paged_attention") is False  # not retried, warned once
    assert caplog.text.count("torch fallback in use") == 1
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setattr(native, "_failed", set())
    assert native.load("paged_attention") is False
    assert "no C++ compiler found" in caplog.text


def test_native_off_switch(monkeypatch) -> None:
    monkeypatch.setenv("FRUGALLM_NATIVE", "0")
    assert native.load("paged_attention") is False
    assert not PagedKVCache(1, 4, 4, 2, 8, torch.bfloat16, "cpu").fused_decode
    assert set(native.status().values()) == {"off (FRUGALLM_NATIVE=0)"}


@needs_kernel
def test_native_status_names_every_kernel() -> None:
    st = native.status()
    # one entry per kernel source: a new csrc file that native.status() forgets fails here
    sources = {p.stem for p in (Path(native.__file__).parent / "csrc").glob("*.cpp")}
    assert set(st) == sources and "paged_attention" in sources
    assert st["paged_attention"] == "in use"


# -- the paged cache's fused decode ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=6,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.to(torch.bfloat16)


@needs_kernel
@torch.inference_mode()
def test_fused_decode_equals_gather_path(bf16_model: Transformer) -> None:
    """Same bf16 pool contents, two decode paths: the kernel and gather + fp32 SDPA agree."""
    model, cfg = bf16_model, bf16_model.config
    bs, rng = 4, random.Random(0)
    seqs = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in (13, 5, 22)]
    caches = [PagedKVCache(cfg.num_layers, 32, bs, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, "cpu")
              for _ in range(2)]
    assert caches[0].fused_decode
    caches[1].fused_decode = False
    tables = [[3 * i + j for j in range(8)] for i in range(3)]  # 3 x 8 blocks of 4 >= 22 + 3 tokens
    done = [0] * 3
    for cache in caches:
        for i, s in enumerate(seqs):
            cache.bind([tables[i]], [0], [len(s)])
            model(torch.tensor([s]), torch.arange(len(s))[None], cache, "last")
    done = [len(s) for s in seqs]
    for _ in range(3):
        toks = [rng.randrange(cfg.vocab_size) for _ in seqs]
        outs = []
        for cache in caches:
            cache.bind(tables, list(done), [1] * 3)
            outs.append(model(torch.tensor(toks)[:, None], torch.tensor(done)[:, None], cache, "last").float())
        torch.testing.assert_close(outs[0], outs[1], atol=0.05, rtol=0.02)  # bf16 activations round
        assert (outs[0].argmax(-1) == outs[1].argmax(-1)).all()
        done = [n + 1 for n in done]
    for layer in range(cfg.num_layers):  # both paths wrote the same keys/values
        assert torch.equal(caches[0].k[layer], caches[1].k[layer])
        assert torch.equal(caches[0].v[layer], caches[1].v[layer])


@needs_kernel
def test_pool_dtype_choice() -> None:
    assert pool_dtype(torch.bfloat16, torch.float32, "cpu") == torch.bfloat16
    assert pool_dtype(torch.float16, torch.float32, "cpu") == torch.bfloat16
    assert pool_dtype(torch.float32, torch.float32, "cpu") == torch.float32  # exact path kept for fp32
    fp32 = PagedKVCache(1, 4, 4, 2, 8, torch.float32, "cpu")
    assert not fp32.fused_decode


@needs_kernel
@pytest.mark.slow
def test_default_model_bf16_engine_agrees_with_generate() -> None:
    """The default model in bf16 on the engine (bf16 pool, fused decode) vs its own single-stream generate
    (fp32 contiguous cache): greedy tokens agree on most positions (bf16 rounding may flip a near-tie)."""
    llm = LLM("default", dtype="bfloat16", device="cpu")
    prompts = ["The capital of France is", "def fibonacci(n):", "Three colours of the rainbow are",
               "Water boils at"]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], sp)[0].token_ids for p in prompts]
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=16))
    assert engine.cache.fused_decode and engine.cache.k[0].dtype == torch.bfloat16
    ids = [llm.tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    rids = [engine.add_request(i, sp) for i in ids]
    seqs = [engine.requests[r].seqs[0] for r in rids]
    engine.run_to_completion()
    got = [s.output().token_ids for s in seqs]
    first_diff = [next((j for j, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                  for x, y in zip(got, alone, strict=True)]
    assert min(first_diff) >= 4, (got, alone)
    assert sum(first_diff) >= 0.75 * 16 * len(prompts), (got, alone)


@needs_kernel
@pytest.mark.parametrize("preempting", [False, True])
def test_engine_fused_decode_matches_unfused(tiny_models, preempting: bool) -> None:
    """A bf16 model on the engine (chunked prefill, prefix hits, preemption, n=2 choices sharing prompt blocks
    copy-on-write): the fused kernel and the gather + SDPA path over the same bf16 pool give the same tokens."""
    llm = LLM(str(tiny_models.hf("llama")), dtype="bfloat16", device="cpu")
    config = (EngineConfig(num_blocks=20, block_size=4, max_num_batched_tokens=16, max_num_seqs=5) if preempting
              else EngineConfig(num_blocks=256, block_size=4, max_num_batched_tokens=7, max_num_seqs=7))
    sp = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)  # the 2 choices diverge
    prompts = prompts_for(llm)
    results = []
    for fused in (True, False):
        engine = LLMEngine(llm, config)
        assert engine.cache.k[0].dtype == torch.bfloat16 and engine.cache.fused_decode
        engine.cache.fused_decode = fused
        results.append([[c.token_ids for c in o] for o in run_engine(engine, prompts, sp, n=2)])
        if preempting:
            assert engine.scheduler.num_preemptions > 0
        else:
            assert engine.block_manager.prefix_hits > 0
    assert results[0] == results[1]
    assert any(c[0] != c[1] for c in results[0])  # forks really diverged from shared blocks


@needs_kernel
def test_fused_kernel_matches_float64_attention() -> None:
    """1,500 bf16 keys/values in 94 scattered blocks, GQA 9/3 heads: the kernel is within fp32 rounding of
    float64 attention over the same bf16 values (at every ISA level it is built for)."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, bs, nb, n = 9, 3, 64, 16, 100, 1500
    q = torch.randn(1, heads, d, generator=g)
    k = (torch.randn(nb, bs, kv_heads, d, generator=g) * 2).bfloat16()
    v = torch.randn(nb, bs, kv_heads, d, generator=g).bfloat16()
    table = torch.randperm(nb, generator=g)[None]
    out = torch.ops.frugallm.paged_decode_attention(q, k, v, table, torch.tensor([n]), d**-0.5)
    kk = k[table[0]].reshape(-1, kv_heads, d)[:n].double()
    vv = v[table[0]].reshape(-1, kv_heads, d)[:n].double()
    s = torch.einsum("hgd,lhd->hgl", q.double().view(kv_heads, heads // kv_heads, d), kk) * d**-0.5
    ref = torch.einsum("hgl,lhd->hgd", s.softmax(-1), vv).reshape(1, heads, d)
    assert (out.double() - ref).abs().max() < 1e-5


@needs_kernel
@pytest.mark.slow
@pytest.mark.skipif(not cpu.fast_bf16(), reason="bf16 is the default compute dtype only on AVX512-BF16 CPUs; "
                    "elsewhere bf16 linears take another rounding path and the 10 % margin below is noise")
def test_default_model_long_context_fused_as_accurate_as_unfused() -> None:
    """1,500 cached tokens (94 scattered blocks) on the default model in bf16, one decode step: the fused
    kernel's logits are as close to the float32 model's as the gather + SDPA path's over the same pool (the
    two differ only in fp32 summation order, but 30 bf16 layers turn that into ~1-ulp logit differences)."""
    from frugallm.corpus import load_corpus

    llm = LLM("default", dtype="bfloat16", device="cpu")
    model, cfg = llm.model, llm.config
    ids = llm.tokenizer.encode(load_corpus("builtin")[:20000])[:1500]
    bs, blocks = 16, 100
    table = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).tolist()
    outs = []
    with torch.inference_mode():
        for fused in (True, False):
            cache = PagedKVCache(cfg.num_layers, blocks, bs, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, "cpu")
            cache.fused_decode = fused
            cache.bind([table], [0], [len(ids)])
            model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, "last")
            cache.bind([table], [len(ids)], [1])
            outs.append(model(torch.tensor([[ids[-1]]]), torch.tensor([[len(ids)]]), cache, "last").float())
    del llm, model
    ref = LLM("default", dtype="float32", device="cpu").score(ids + [ids[-1]])[-1:].float()
    err_fused, err_unfused = (outs[0] - ref).abs().mean(), (outs[1] - ref).abs().mean()
    assert err_fused <= 1.1 * err_unfused + 0.01, (err_fused, err_unfused)
    assert outs[0].argmax() == outs[1].argmax() == ref.argmax()
