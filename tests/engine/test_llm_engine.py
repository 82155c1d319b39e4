"""Paged cache, LLMEngine and AsyncLLM on tiny random models (and a short parity run on the default model)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from engine_runs import prompts_for, run_engine
from frugallm import LLM, SamplingParams
from frugallm.config import ModelConfig
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.batched import generate_batched
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.engine.model_runner import group_prefills
from frugallm.engine.paged_cache import PagedKVCache
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.model.kv_cache import ContiguousKVCache
from frugallm.model.llama import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


# -- paged cache == contiguous cache ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_transformer() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=128)
    m = Transformer(cfg).float().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def contiguous_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Logits ``[len(ids), vocab]`` with a plain cache, one token at a time after a 1-token prefill."""
    cache = ContiguousKVCache(model.config.num_layers, 1, model.config.num_kv_heads, model.config.head_dim,
                              len(ids), torch.float32, "cpu")
    x = torch.tensor([ids])
    return model(x, torch.arange(len(ids))[None], cache, "all")[0]


@torch.inference_mode()
def test_paged_attention_equals_contiguous(tiny_transformer: Transformer) -> None:
    model, cfg = tiny_transformer, tiny_transformer.config
    bs = 4
    rng = random.Random(0)
    seqs = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in (13, 5, 22)]
    refs = [contiguous_logits(model, s) for s in seqs]
    num_blocks = 32
    cache = PagedKVCache(cfg.num_layers, num_blocks, bs, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered, out-of-order blocks
    tables: list[list[int]] = [[] for _ in seqs]
    done = [0] * len(seqs)
    # Ragged chunked prefill (several chunks, rows of different lengths in one right-padded batch), then
    # batched decode (one token per row, different context lengths).
    schedule = [[4, 5, 3], [6, 0, 7], [2, 0, 10], [1, 0, 1], [0, 0, 1]]
    for chunk in schedule:
        rows = [i for i, n in enumerate(chunk) if n]
        for i in rows:
            while len(tables[i]) * bs < done[i] + chunk[i]:
                tables[i].append(free.pop())
        t = max(chunk[i] for i in rows)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        pos = torch.zeros(len(rows), t, dtype=torch.long)
        for r, i in enumerate(rows):
            n = chunk[i]
            ids[r, :n] = torch.tensor(seqs[i][done[i]:done[i] + n])
            pos[r, :n] = torch.arange(done[i], done[i] + n)
            pos[r, n:] = done[i] + n - 1
        cache.bind([tables[i] for i in rows], [done[i] for i in rows], [chunk[i] for i in rows])
        out = model(ids, pos, cache, "all")
        for r, i in enumerate(rows):
            n = chunk[i]
            torch.testing.assert_close(out[r, :n], refs[i][done[i]:done[i] + n], atol=1e-5, rtol=1e-5)
            done[i] += n
    # Decode: every row one token, batched.
    for _ in range(3):
        extra = [rng.randrange(cfg.vocab_size) for _ in seqs]
        for i, tok in enumerate(extra):
            seqs[i].append(tok)
            if len(tables[i]) * bs < done[i] + 1:
                tables[i].append(free.pop())
        cache.bind(tables, list(done), [1] * len(seqs))
        ids = torch.tensor(extra)[:, None]
        out = model(ids, torch.tensor(done)[:, None], cache, "last")
        for i in range(len(seqs)):
            torch.testing.assert_close(out[i], contiguous_logits(model, seqs[i])[-1], atol=1e-5, rtol=1e-5)
            done[i] += 1


@torch.inference_mode()
def test_single_row_paged_is_bitwise_contiguous(tiny_transformer: Transformer) -> None:
    model, cfg = tiny_transformer, tiny_transformer.config
    ids = list(range(3, 20))
    cache = PagedKVCache(cfg.num_layers, 8, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    cache.bind([[5, 2, 7, 0, 1]], [0], [len(ids)])
    got = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, "all")[0]
    assert torch.equal(got, contiguous_logits(model, ids))


def test_copy_blocks_duplicates_every_layer() -> None:
    cache = PagedKVCache(3, 4, 2, 1, 4, torch.float32, "cpu")
    for t in (*cache.k, *cache.v):
        t.normal_()
    cache.copy_blocks([(1, 3)])
    for t in (*cache.k, *cache.v):
        assert torch.equal(t[3], t[1])


def test_group_prefills_bounds_padding() -> None:
    assert group_prefills([128, 128, 128]) == [[0, 1, 2]]
    groups = group_prefills([500, 12, 480, 10])
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3]]


# -- the engine on a tiny model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")






GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
CONFIGS = {
    "default": EngineConfig(num_blocks=256, block_size=4),
    "small-budget": EngineConfig(num_blocks=256, block_size=4, max_num_batched_tokens=7, max_num_seqs=7),
    "preempting": EngineConfig(num_blocks=20, block_size=4, max_num_batched_tokens=16, max_num_seqs=5),
    "no-chunking": EngineConfig(num_blocks=256, block_size=8, enable_chunked_prefill=False),
    "no-chunking-preempting": EngineConfig(num_blocks=18, block_size=4, enable_chunked_prefill=False,
                                           max_num_batched_tokens=16),
    "no-prefix-cache": EngineConfig(num_blocks=64, block_size=16, enable_prefix_caching=False),
}


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[list[int]]:
    return [llm.generate([p], GREEDY)[0].token_ids for p in prompts_for(llm)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_greedy_equals_alone(llm: LLM, reference: list[list[int]], name: str) -> None:
    engine = LLMEngine(llm, CONFIGS[name])
    outs = run_engine(engine, prompts_for(llm), GREEDY)
    assert [o[0].token_ids for o in outs] == reference
    if name.endswith("preempting"):
        assert engine.scheduler.num_preemptions > 0
    if name == "small-budget":  # later prompts find the shared prefix computed by earlier ones
        assert engine.block_manager.prefix_hits > 0


def test_generate_batched_matches_generate(llm: LLM, reference: list[list[int]]) -> None:
    outs = generate_batched(llm, prompts_for(llm), [GREEDY] * len(reference))
    assert [o.token_ids for o in outs] == reference
    assert [o.request_id for o in outs] == list(range(len(reference)))
    assert all(o.finish_reason == "length" and o.metrics["output_tokens"] == 12 for o in outs)


def test_prefix_cache_hit_gives_same_tokens(llm: LLM) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    p = prompts_for(llm)[0]
    first = run_engine(engine, [p], GREEDY)[0][0]
    rid = engine.add_request(p, GREEDY)
    state = engine.requests[rid].seqs[0]
    seq = engine.requests[rid].seqs[0]
    engine.run_to_completion()
    assert state.num_cached_tokens == (len(p) - 1) // 4 * 4 > 0
    assert seq.output_ids == first.token_ids


def test_identical_prompts_together_share_prefix_blocks(llm: LLM, reference: list[list[int]]) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    p = prompts_for(llm)[0]
    rids = [engine.add_request(p, GREEDY) for _ in range(3)]
    states = [engine.requests[r].seqs[0] for r in rids]
    seqs = [engine.requests[r].seqs[0] for r in rids]
    engine.run_to_completion()
    assert [s.num_cached_tokens for s in states] == [0] + [(len(p) - 1) // 4 * 4] * 2
    assert all(s.output_ids == reference[0] for s in seqs)


def test_single_request_sampling_matches_generate(llm: LLM) -> None:
    """Seeded sampling, penalties, stop strings and logprobs follow LLM.generate exactly when alone."""
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    params = [
        SamplingParams(max_tokens=10, temperature=1.2, top_p=0.9, top_k=50, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.7, min_p=0.05, seed=3, presence_penalty=0.5,
                       frequency_penalty=0.3, repetition_penalty=1.2, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=10, temperature=0, logprobs=0, ignore_eos=True),
    ]
    for sp in params:
        ref = llm.generate(["the cat sat"], sp)[0]
        got = run_engine(engine, ["the cat sat"], sp)[0][0]
        assert got.token_ids == ref.token_ids and got.text == ref.text
        if sp.logprobs is not None:
            assert got.logprobs is not None and len(got.logprobs) == len(ref.logprobs)
            for a, b in zip(got.logprobs, ref.logprobs, strict=True):
                assert a.keys() == b.keys()
                assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    text = llm.generate(["abc"], GREEDY)[0].text
    stop = text[2:5]
    ref = llm.generate(["abc"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    got = run_engine(engine, ["abc"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop,)))
    assert got[0][0].text == ref.text and got[0][0].finish_reason == "stop"


def test_n_choices_share_the_prompt(llm: LLM) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    p = prompts_for(llm)[1]
    alone = run_engine(engine, [p], GREEDY)[0][0].token_ids
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4, enable_prefix_caching=False))
    outs = run_engine(engine, [p], GREEDY, n=3)[0]
    assert [o.token_ids for o in outs] == [alone] * 3  # copy-on-write kept every choice intact
    assert engine.scheduler.num_preemptions == 0
    sampled = SamplingParams(max_tokens=12, temperature=1.5, seed=11, ignore_eos=True)
    a = [o.token_ids for o in run_engine(engine, [p], sampled, n=3)[0]]
    b = [o.token_ids for o in run_engine(engine, [p], sampled, n=3)[0]]
    assert a == b and len({tuple(x) for x in a}) == 3  # reproducible, and distinct per choice


def test_step_outputs_stream_the_final_text(llm: LLM) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    rid = engine.add_request("hello there", SamplingParams(max_tokens=15, temperature=0, ignore_eos=True), n=2)
    seqs = list(engine.requests[rid].seqs)
    texts, toks = ["", ""], [[], []]
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.index] += out.text
            toks[out.index] += out.token_ids
    assert texts == [s.text for s in seqs] and toks == [s.output_ids for s in seqs]


def test_abort_frees_blocks(llm: LLM) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=8, max_num_seqs=8))
    a = engine.add_request(list(range(3, 40)), GREEDY)
    b = engine.add_request(list(range(3, 10)), GREEDY, n=2)
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort(a) and engine.abort(b)
    assert not engine.abort("nope")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert engine.step() == []


def test_request_validation(llm: LLM) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=8, block_size=4, max_num_seqs=2))
    assert engine.max_model_len == 32  # capped to what the pool holds
    with pytest.raises(InvalidRequestError, match="context window"):
        engine.add_request(list(range(3, 40)), GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("", GREEDY)
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.add_request([10**6], GREEDY)
    with pytest.raises(InvalidRequestError, match="n must be"):
        engine.add_request([5, 6], GREEDY, n=3)
    with pytest.raises(FrugalError, match="block_size"):
        EngineConfig(block_size=0)
    # A long max_tokens is clamped to the context (finish_reason "length"), never an overflow.
    out = run_engine(engine, [list(range(3, 30))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert out[0][0].finish_reason == "length" and len(out[0][0].token_ids) == 32 - 27


def test_metrics_render(llm: LLM) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    run_engine(engine, prompts_for(llm)[:3], GREEDY)
    text = engine.metrics.render()
    for name in ("time_to_first_token_seconds_bucket", "time_per_output_token_seconds_count",
                 "num_requests_running 0", "num_requests_waiting 0", "kv_blocks_used 0", "kv_blocks_free 64",
                 "generation_tokens_total 36", 'request_success_total{finished_reason="length"} 3'):
        assert f"frugallm_{name}" in text, name


# -- AsyncLLM -----------------------------------------------------------------------------------------------
def test_async_concurrent_requests_and_cancel(llm: LLM) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4))
    allp = prompts_for(llm)
    ref = [llm.generate([p], GREEDY)[0].token_ids for p in allp[:4]]
    a = AsyncLLM(engine).start()

    async def collect(p: list[int]) -> list[int]:
        toks: list[int] = []
        async for out in a.generate(p, GREEDY):
            toks += out.token_ids
        return toks

    async def cancelled() -> None:
        agen = a.generate(list(range(3, 30)), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        async for _ in agen:
            break  # the client goes away after the first token
        await agen.aclose()

    async def main() -> list[list[int]]:
        res = await asyncio.gather(*(collect(p) for p in allp[:4]), cancelled())
        with pytest.raises(InvalidRequestError):
            async for _ in a.generate([], GREEDY):
                pass
        return res[:4]

    try:
        assert asyncio.run(main()) == ref
        for _ in range(100):  # the abort is applied by the engine thread at its next iteration
            if engine.block_manager.num_used_blocks == 0 and not engine.requests:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert engine.block_manager.num_used_blocks == 0 and not engine.requests
    finally:
        a.shutdown()
    assert not a.is_alive


# -- the default model --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_batched_equals_alone() -> None:
    llm = LLM("default", dtype="float32", device="cpu")
    prompts = ["The capital of France is", "def fibonacci(n):", "Three colours of the rainbow are",
               "Water boils at"]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], sp)[0].token_ids for p in prompts]
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=16, max_num_batched_tokens=16))
    outs = run_engine(engine, [llm.tokenizer.encode(p, add_special_tokens=True) for p in prompts], sp)
    assert [o[0].token_ids for o in outs] == alone


def test_quantized_weights_under_batching(tiny_models) -> None:
    from frugallm.quant import quantize_model

    qllm = LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")
    quantize_model(qllm.model, "int8")
    prompts = prompts_for(qllm, 4)
    ref = [qllm.generate([p], GREEDY)[0].token_ids for p in prompts]
    outs = run_engine(LLMEngine(qllm, EngineConfig(num_blocks=128, block_size=4)), prompts, GREEDY)
    assert [o[0].token_ids for o in outs] == ref


def test_async_launch_builds_in_the_engine_thread(llm: LLM) -> None:
    """``AsyncLLM.launch`` runs the build (model load) in the thread that serves; build errors surface."""
    import threading

    built_in: list[str] = []

    def build() -> LLMEngine:
        built_in.append(threading.current_thread().name)
        return LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))

    a = AsyncLLM.launch(build)
    try:
        assert built_in == ["frugallm-engine"] and a.is_alive
        p = prompts_for(llm)[0]

        async def collect() -> list[int]:
            return [t async for out in a.generate(p, GREEDY) for t in out.token_ids]

        assert asyncio.run(collect()) == llm.generate([p], GREEDY)[0].token_ids
    finally:
        a.shutdown()

    def broken() -> LLMEngine:
        raise InvalidRequestError("no such model: nowhere.gguf")

    with pytest.raises(InvalidRequestError, match="nowhere.gguf"):
        AsyncLLM.launch(broken)
