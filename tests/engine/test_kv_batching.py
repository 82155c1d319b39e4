"""KV policies on the paged engine (issue 17 item 5): SnapKV evicts at prefill, compacts, frees blocks.

The key check: the paged engine with a policy gives the static-cache ``LLM`` with the same spec the same greedy
tokens (the same kept slots, so the same logits within fp32 rounding), under chunked prefill, preemption,
forks, mixed batches and prefix-cache sharing.
"""

from __future__ import annotations

import random

import pytest

from engine_runs import run_engine
from frugallm import LLM, SamplingParams
from frugallm.engine import batched
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.errors import InvalidRequestError
from frugallm.kv import KVSpecError, parse_kv_spec

pytestmark = pytest.mark.usefixtures("one_thread")

KV = "snapkv:budget=0.25,window=8"
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
CONFIGS = {
    "whole-prompts": EngineConfig(num_blocks=128, block_size=4),
    "chunked": EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=24, max_num_seqs=4),
    "block-16": EngineConfig(num_blocks=32, block_size=16, max_num_batched_tokens=40),
    "preempting": EngineConfig(num_blocks=40, block_size=4, max_num_batched_tokens=64, max_num_seqs=4),
    "no-chunking": EngineConfig(num_blocks=128, block_size=8, enable_chunked_prefill=False),
    "no-prefix-cache": EngineConfig(num_blocks=64, block_size=8, enable_prefix_caching=False),
}


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu", kv=KV)


@pytest.fixture(scope="module")
def full(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


def prompts(llm: LLM, n: int = 5, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    v = llm.config.vocab_size
    shared = [rng.randrange(3, v) for _ in range(24)]
    return [(shared if i % 2 else []) + [rng.randrange(3, v) for _ in range(rng.randrange(40, 90))]
            for i in range(n)]


@pytest.fixture(scope="module")
def static(llm: LLM) -> list[list[int]]:
    """Each prompt alone through the static contiguous cache with the same spec."""
    return [llm.generate([p], GREEDY)[0].token_ids for p in prompts(llm)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_paged_snapkv_equals_static(llm: LLM, full: LLM, static: list[list[int]], name: str) -> None:
    outs = run_engine(LLMEngine(llm, CONFIGS[name]), prompts(llm), GREEDY)
    assert [o[0].token_ids for o in outs] == static
    # Not vacuous: the policy changes what the model generates on these prompts.
    assert static != [full.generate([p], GREEDY)[0].token_ids for p in prompts(llm)]


def test_blocks_return_to_the_pool_after_prefill(llm: LLM) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    p = prompts(llm, 1)[0]
    rid = engine.add_request(p, GREEDY)
    seq = engine.requests[rid].seqs[0]
    engine.step()  # the whole prompt, then compaction, then its first token
    keep = parse_kv_spec(KV).evictor.prefill_keep(len(p), 0, llm.config.num_layers)
    bm = engine.block_manager
    assert keep < len(p)
    assert seq.num_evicted == len(p) - keep and bm.num_slots(seq) == keep
    assert bm.num_used_blocks == bm.blocks_for(keep)  # blocks_for(len(p)) - blocks_for(keep) went back
    engine.step()  # the first decode writes after the kept slots; positions go on from the true length
    assert bm.num_slots(seq) == keep + 1 and seq.num_computed_tokens == len(p) + 1
    engine.run_to_completion()
    bm.check()
    assert bm.num_used_blocks == 0


def test_mixed_batch_policy_and_full(llm: LLM, full: LLM, static: list[list[int]]) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=48))
    ps = prompts(llm)
    kvs = [None if i % 2 else "full" for i in range(len(ps))]  # None: the engine's (the LLM's) policy
    rids = [engine.add_request(p, GREEDY, kv=kv) for p, kv in zip(ps, kvs, strict=True)]
    seqs = [engine.requests[r].seqs[0] for r in rids]
    while engine.has_unfinished_requests():
        engine.step()
        engine.block_manager.check()
    assert engine.block_manager.num_used_blocks == 0
    for i, (p, s) in enumerate(zip(ps, seqs, strict=True)):
        want = static[i] if kvs[i] is None else full.generate([p], GREEDY)[0].token_ids
        assert s.output().token_ids == want, i


def test_full_engine_mixes_in_policy_requests(llm: LLM, full: LLM, static: list[list[int]]) -> None:
    engine = LLMEngine(full, EngineConfig(num_blocks=128, block_size=4))  # no default policy
    ps = prompts(llm)
    rids = [engine.add_request(p, GREEDY, kv=KV if i < 2 else None) for i, p in enumerate(ps)]
    seqs = [engine.requests[r].seqs[0] for r in rids]
    engine.run_to_completion()
    assert [s.output().token_ids for s in seqs[:2]] == static[:2]
    assert seqs[2].output().token_ids == full.generate([ps[2]], GREEDY)[0].token_ids


@pytest.mark.parametrize("first", ["full", "policy"])
def test_shared_prefix_blocks_stay_intact(llm: LLM, full: LLM, first: str) -> None:
    """A sequence compacting under eviction never writes the prefix blocks it shares with another."""
    rng = random.Random(5)
    v = llm.config.vocab_size
    prefix = [rng.randrange(3, v) for _ in range(48)]
    a = prefix + [rng.randrange(3, v) for _ in range(20)]
    b = prefix + [rng.randrange(3, v) for _ in range(30)]
    kv_a, kv_b = ("full", KV) if first == "full" else (KV, "full")
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4))
    bm = engine.block_manager
    ra = engine.add_request(a, GREEDY, kv=kv_a)
    sa = engine.requests[ra].seqs[0]
    engine.step()  # a's prompt is computed (and its full blocks registered), a is decoding
    rb = engine.add_request(b, GREEDY, kv=kv_b)
    sb = engine.requests[rb].seqs[0]
    while engine.has_unfinished_requests():
        engine.step()
        bm.check()
    assert bm.num_used_blocks == 0
    want = {"full": full.generate, KV: llm.generate}
    assert sa.output().token_ids == want[kv_a]([a], GREEDY)[0].token_ids
    assert sb.output().token_ids == want[kv_b]([b], GREEDY)[0].token_ids
    if first == "full":  # the compressed sequence reused a's cached prefix (copy-on-write at compaction)
        assert sb.num_cached_tokens > 0


def test_compacted_blocks_leave_the_prefix_cache(llm: LLM, full: LLM) -> None:
    """A later request with the same prompt must not reuse blocks a compacted sequence overwrote."""
    p = prompts(llm, 1, seed=3)[0]
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4))
    engine.add_request(p, GREEDY)
    engine.run_to_completion()
    rid = engine.add_request(p, GREEDY, kv="full")
    seq = engine.requests[rid].seqs[0]
    engine.run_to_completion()
    engine.block_manager.check()
    assert seq.output().token_ids == full.generate([p], GREEDY)[0].token_ids


def test_forked_samples_share_compacted_blocks(llm: LLM, static: list[list[int]]) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4))
    outs = run_engine(engine, prompts(llm)[:2], GREEDY, n=3)
    for o, want in zip(outs, static[:2], strict=True):
        assert [c.token_ids for c in o] == [want] * 3


def test_llm_generate_batches_paged_policies(llm: LLM, static: list[list[int]], monkeypatch) -> None:
    calls = []
    real = batched.generate_batched
    monkeypatch.setattr(batched, "generate_batched", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    outs = llm.generate(prompts(llm), GREEDY)
    assert calls, "several prompts with a paged policy go through the engine"
    assert [o.token_ids for o in outs] == static
    assert all(o.metrics["kv_cache_bytes"] > 0 for o in outs)


def test_policies_that_do_not_page_are_refused(llm: LLM, full: LLM) -> None:
    with pytest.raises(KVSpecError, match="snapkv"):
        EngineConfig(kv="xquant:bits=2")
    with pytest.raises(KVSpecError, match="xquant cannot"):
        EngineConfig(kv="snapkv:budget=0.25+xquant:bits=2")
    engine = LLMEngine(full, EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=16))
    with pytest.raises(InvalidRequestError, match="lacache"):
        engine.add_request([5, 6, 7], GREEDY, kv="lacache:budget=0.5")
    with pytest.raises(InvalidRequestError, match="max_num_batched_tokens"):
        engine.add_request(list(range(3, 60)), GREEDY, kv="snapkv:window=32")
    xq = LLM(str(full.loaded.path), dtype="float32", device="cpu", kv="xquant:bits=4")
    with pytest.raises(KVSpecError, match="snapkv"):
        LLMEngine(xq, EngineConfig(num_blocks=32, block_size=4))
    # LLM.generate still runs such policies, on the static batch.
    assert len(xq.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=2, temperature=0))) == 2


def test_compressed_requests_share_a_cached_prompt(llm: LLM, static: list[list[int]]) -> None:
    """Compaction copies out of cached prompt blocks while blocks are free: the next request with the same
    prompt still reuses them."""
    p = prompts(llm)[0]
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4))
    first = run_engine(engine, [p], GREEDY)[0][0]
    rid = engine.add_request(p, GREEDY)
    seq = engine.requests[rid].seqs[0]
    engine.run_to_completion()
    engine.block_manager.check()
    assert seq.num_cached_tokens > 0
    assert first.token_ids == seq.output().token_ids == static[0]


def test_preempted_after_compaction_recomputes_the_same_cache(llm: LLM, monkeypatch) -> None:
    """A compressed sequence that is preempted recomputes its prompt, is compacted again, then computes its
    generated tokens: it ends as if never preempted."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ps = prompts(llm)
    want = [llm.generate([p], params)[0].token_ids for p in ps]
    calls = []
    real = LLMEngine._compact
    monkeypatch.setattr(LLMEngine, "_compact", lambda self, seq, *a: calls.append(seq) or real(self, seq, *a))
    engine = LLMEngine(llm, EngineConfig(num_blocks=34, block_size=4, max_num_batched_tokens=64, max_num_seqs=4))
    outs = run_engine(engine, ps, params)
    assert len(calls) > len(ps), "a sequence was preempted after its compaction"
    for p, o, w in zip(ps, outs, want, strict=True):  # the pool caps the context: a few stop early
        assert o[0].token_ids == w[:min(len(w), engine.max_model_len - len(p))]


def test_engine_config_kv_applies_to_every_request(full: LLM, static: list[list[int]]) -> None:
    """``serve --kv snapkv:...`` builds this config: every request compresses, ``kv="full"`` opts out."""
    engine = LLMEngine(full, EngineConfig(num_blocks=128, block_size=4, kv=KV))
    ps = prompts(full)
    outs = run_engine(engine, ps, GREEDY)
    assert [o[0].token_ids for o in outs] == static


@pytest.mark.slow
def test_default_model_bf16_pool_matches_static() -> None:
    """The default model in bf16: the paged pool is bf16 and decode runs the fused kernel over compacted blocks;
    the static cache stores bf16 and attends in fp32. Same greedy tokens on passkey prompts."""
    from frugallm.lab import passkey

    llm = LLM("default", dtype="bfloat16", kv="snapkv:budget=0.25")
    hay = passkey.haystack("prose")
    ps = [passkey.make_prompt(llm.tokenizer, 512, d, k, sentences=hay.units, sep=hay.sep)
          for d, k in ((0.25, "10512"), (0.75, "18431"))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [llm.generate([p.ids], params)[0].token_ids for p in ps]
    engine = LLMEngine(llm, EngineConfig(num_blocks=80, block_size=16))
    assert [o[0].token_ids for o in run_engine(engine, [p.ids for p in ps], params)] == want


# -- StreamingLLM (positions=original): its window slides in place over the sequence's blocks -----------------
SLIDING = ["streamingllm:budget=0.25,positions=original", "streamingllm:sinks=2,window=20,positions=original",
           "streamingllm:sinks=4,window=120,positions=original"]  # the last: prompts under the window grow into it
LONG = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def sliding(tiny_models) -> dict[str, tuple[LLM, list[list[int]]]]:
    """Each sliding spec's LLM and its static-cache greedy outputs for ``prompts()``."""
    out = {}
    for kv in SLIDING:
        llm = LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu", kv=kv)
        out[kv] = llm, [llm.generate([p], LONG)[0].token_ids for p in prompts(llm)]
    return out


@pytest.mark.parametrize("name", ["whole-prompts", "chunked", "preempting", "no-prefix-cache"])
@pytest.mark.parametrize("kv", SLIDING)
def test_paged_sliding_window_equals_static(sliding, kv: str, name: str) -> None:
    llm, want = sliding[kv]
    engine = LLMEngine(llm, CONFIGS[name])
    ps = prompts(llm)
    outs = run_engine(engine, ps, LONG)
    for p, o, w in zip(ps, outs, want, strict=True):  # a small pool caps the context: a few stop early
        assert o[0].token_ids == w[:min(len(w), engine.max_model_len - len(p))]


def test_sliding_window_holds_its_blocks(sliding) -> None:
    llm, want = sliding[SLIDING[1]]  # sinks 2 + window 20: 22 slots, then one more for the step's new token
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    p = prompts(llm)[0]
    rid = engine.add_request(p, LONG)
    seq = engine.requests[rid].seqs[0]
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        held.append(engine.block_manager.num_used_blocks)
        if not seq.finished:
            assert engine.block_manager.num_slots(seq) <= 23
    assert max(held[1:-1]) == engine.block_manager.blocks_for(23) and held[-1] == 0
    assert seq.output().token_ids == want[0] and seq.num_slid == 0  # freed: its counters reset


def test_sliding_forks_copy_the_block_they_overwrite(sliding) -> None:
    llm, want = sliding[SLIDING[1]]
    outs = run_engine(LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4)), prompts(llm)[:2], LONG, n=2)
    assert [[c.token_ids for c in o] for o in outs] == [[w, w] for w in want[:2]]


def test_sliding_positions_cache_is_refused() -> None:
    with pytest.raises(KVSpecError, match="positions=original"):
        EngineConfig(kv="streamingllm:budget=0.25")


def test_server_with_kv_policy(llm: LLM, full: LLM) -> None:
    """``serve --kv snapkv:...``: the OpenAI server on an engine whose config names the policy."""
    from fastapi.testclient import TestClient

    from frugallm.engine.async_llm import AsyncLLM
    from frugallm.serve.app import create_app

    engine = LLMEngine(full, EngineConfig(num_blocks=128, block_size=4, kv=KV))
    ps = prompts(llm)[:3]
    with TestClient(create_app(AsyncLLM(engine).start(), "tiny")) as client:
        for p in ps:
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 12,
                                                     "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == llm.generate([p], GREEDY)[0].text
    assert engine.block_manager.num_used_blocks == 0


def test_no_block_to_copy_shared_prefix_falls_back_to_full_cache(llm: LLM, full: LLM) -> None:
    """Compaction must not write blocks it shares; with no free block to copy them into, the sequence keeps its
    full cache (and runs as kv="full") instead."""
    rng = random.Random(7)
    a = [rng.randrange(3, llm.config.vocab_size) for _ in range(64)]
    b = a + [rng.randrange(3, llm.config.vocab_size) for _ in range(8)]
    engine = LLMEngine(llm, EngineConfig(num_blocks=21, block_size=4))
    ra = engine.add_request(a, GREEDY, kv="full")
    engine.step()  # a's 16 prompt blocks are computed and cached; b will share all of them
    rb = engine.add_request(b, GREEDY)
    sa, sb = engine.requests[ra].seqs[0], engine.requests[rb].seqs[0]
    while engine.has_unfinished_requests():
        engine.step()
        engine.block_manager.check()
    assert engine.num_uncompacted == 1 and sb.num_cached_tokens >= 64
    assert sa.output().token_ids == full.generate([a], GREEDY)[0].token_ids
    assert sb.output().token_ids == full.generate([b], GREEDY)[0].token_ids



# -- H2O: heavy hitters scored at every step, the kept slots compacted in place ----------------------------------
H2O = ["h2o:budget=0.25", "h2o:budget=0.5,recent=0.25"]


@pytest.fixture(scope="module")
def heavy(tiny_models) -> dict[str, tuple[LLM, list[list[int]]]]:
    out = {}
    for kv in H2O:
        llm = LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu", kv=kv)
        out[kv] = llm, [llm.generate([p], LONG)[0].token_ids for p in prompts(llm)]
    return out


@pytest.mark.parametrize("name", ["whole-prompts", "preempting", "no-chunking", "no-prefix-cache"])
@pytest.mark.parametrize("kv", H2O)
def test_paged_h2o_equals_static(heavy, kv: str, name: str) -> None:
    llm, want = heavy[kv]
    cfg = CONFIGS[name]
    if cfg.max_num_batched_tokens < 128:  # H2O reads every prompt query: a prompt is one pass
        cfg = EngineConfig(**{**cfg.__dict__, "max_num_batched_tokens": 128})
    engine = LLMEngine(llm, cfg)
    ps = prompts(llm)
    outs = run_engine(engine, ps, LONG)
    for p, o, w in zip(ps, outs, want, strict=True):
        assert o[0].token_ids == w[:min(len(w), engine.max_model_len - len(p))]


def test_h2o_holds_its_capacity_and_refuses_shared_samples(heavy) -> None:
    llm, want = heavy[H2O[0]]
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    p = prompts(llm)[0]
    rid = engine.add_request(p, LONG)
    seq = engine.requests[rid].seqs[0]
    cap = parse_kv_spec(H2O[0]).evictor.prefill_keep(len(p), 0, 2)
    while engine.has_unfinished_requests():
        engine.step()
        if not seq.finished:
            assert engine.block_manager.num_slots(seq) <= cap + 1
    assert seq.output().token_ids == want[0]
    with pytest.raises(InvalidRequestError, match="n=1"):
        engine.add_request(p, LONG, n=2)
    with pytest.raises(InvalidRequestError, match="n=1"):  # as the server hands it over
        engine.add_request(engine.inputs.process(p, LONG, n=2))
    with pytest.raises(InvalidRequestError, match="max_num_batched_tokens"):
        LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=32)).add_request(p, LONG)


@pytest.mark.parametrize("kv", [KV, "h2o:budget=0.25", "streamingllm:budget=0.25,positions=original"])
def test_more_sequences_fit_the_same_pool(llm: LLM, kv: str) -> None:
    """The point of evicting under batching: in a pool that holds two full sequences, compressed ones run 2x+
    as many at once (each keeps a quarter of its prompt; one prompt at a time needs all its blocks)."""
    rng = random.Random(11)
    ps = [[rng.randrange(3, llm.config.vocab_size) for _ in range(100)] for _ in range(8)]
    peak = {}
    for spec in ("full", kv):
        engine = LLMEngine(llm, EngineConfig(num_blocks=2 * 28, block_size=4, max_num_batched_tokens=128,
                                             max_num_seqs=8, kv=spec))
        for p in ps:
            engine.add_request(p, GREEDY)
        peak[spec] = 0
        while engine.has_unfinished_requests():
            engine.step()
            peak[spec] = max(peak[spec], sum(s.num_computed_tokens >= s.num_prompt_tokens
                                             for s in engine.scheduler.running))
        assert engine.block_manager.num_used_blocks == 0
    assert peak["full"] == 2 and peak[kv] >= 2 * peak["full"], peak


def test_llm_generate_sizes_one_pass_prompts_for_h2o(tiny_models) -> None:
    """LLM.generate batches H2O: prompts longer than the default step budget still run (one pass each)."""
    llm = LLM(str(tiny_models.hf("llama", max_position_embeddings=1024)), dtype="float32", device="cpu",
              kv="h2o:budget=0.25")
    rng = random.Random(3)
    ps = [[rng.randrange(3, llm.config.vocab_size) for _ in range(n)] for n in (600, 540)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(ps, params)] == [llm.generate([p], params)[0].token_ids for p in ps]
