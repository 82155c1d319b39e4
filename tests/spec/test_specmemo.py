"""SpecMemo: the memory a speculative request holds in the server is charged to the engine's KV block pool
(``engine/spec_solo.py``, ``spec/memo.py``, ``BlockManager.reserve``): the pool's free blocks drop by what it
takes and come back after; a pool that cannot spare them decodes plainly with the same greedy output; the draft's
blocks go back while speculation is off and the engine needs them, never a preempted sequence."""

from __future__ import annotations

import asyncio

import pytest

from frugallm import LLM, SamplingParams
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.block_manager import BlockManager
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.engine.spec_solo import SoloSpec
from frugallm.spec import parse_spec
from frugallm.spec.memo import blocks_for_bytes, plan

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPT = "hello world, hello world, hello"
SPECS = ["ngram:k=4:adaptive=off", "self:layers=1:k=3:adaptive=off"]


@pytest.fixture(scope="module")
def path(tiny_models) -> str:
    return str(tiny_models.gguf("llama", "F32"))


@pytest.fixture(scope="module")
def reference(path: str) -> list[int]:
    return LLM(path, dtype="float32", device="cpu").generate(PROMPT, GREEDY)[0].token_ids


def make(path: str, spec: str, num_blocks: int, handoff: bool = False) -> tuple[LLM, LLMEngine, SoloSpec]:
    """``handoff=False`` (most tests here): a busy server gates the solo request instead of taking it into the
    engine's batch, the path whose reserved blocks come and go."""
    llm = LLM(path, dtype="float32", device="cpu")
    llm.set_spec(spec)
    engine = LLMEngine(llm, EngineConfig(num_blocks=num_blocks, block_size=4))
    return llm, engine, SoloSpec(engine, handoff=handoff)


def run_solo(solo: SoloSpec, during: list[int] | None = None) -> list[int]:
    toks: list[int] = []
    while solo.running:
        out = solo.step()
        toks += out.token_ids
        if during is not None:
            during.append(solo.engine.block_manager.num_free_blocks)
    return toks


def test_reserve_takes_free_blocks_uncached_first_and_gives_them_back() -> None:
    bm = BlockManager(8, 4)
    bm.blocks[0].hash, bm.blocks[0].token_ids = 123, (1, 2, 3, 4)  # a cached prefix sitting in the free list
    bm.hash_to_block[123] = 0
    ids = bm.reserve(3)
    assert ids is not None and 0 not in ids and bm.num_free_blocks == 5 and bm.num_reserved == 3
    assert 123 in bm.hash_to_block  # the prefix cache kept its block while uncached ones were free
    assert bm.reserve(6) is None and bm.num_free_blocks == 5  # all or nothing
    rest = bm.reserve(5)
    assert rest is not None and 0 in rest and 123 not in bm.hash_to_block  # taken last, and forgotten
    bm.check()
    bm.unreserve(ids)
    bm.unreserve(rest)
    assert bm.num_free_blocks == 8 and bm.num_reserved == 0
    bm.check()


@pytest.mark.parametrize("spec", SPECS)
def test_plan_matches_what_the_solo_run_allocates(path: str, spec: str) -> None:
    llm = LLM(path, dtype="float32", device="cpu")
    llm.set_spec(spec)
    cfg = parse_spec(spec)
    prompt = llm.tokenizer.encode(PROMPT)
    memo = plan(cfg, llm.config, None, len(prompt), GREEDY.max_tokens, llm.kv_dtype)
    capacity = len(prompt) + GREEDY.max_tokens + cfg.k + 1  # as SoloRunner._run sizes the caches
    cache = llm.make_cache(1, capacity)
    assert memo.target_kv + memo.candidates_kv == cache.reserved_bytes()
    proposer = llm._proposer()
    proposer.begin(prompt, capacity)
    draft = proposer.cache.reserved_bytes() if getattr(proposer, "cache", None) is not None else 0
    assert memo.draft_kv == draft and (draft > 0) == spec.startswith("self")
    assert memo.logits == (cfg.k + 1) * llm.config.vocab_size * 4
    assert memo.spec_bytes == memo.candidates_kv + memo.logits + memo.draft_kv


@pytest.mark.parametrize("spec", SPECS)
def test_free_blocks_drop_by_the_reservation_and_return(path: str, spec: str, reference: list[int]) -> None:
    llm, engine, solo = make(path, spec, num_blocks=256)
    bm = engine.block_manager
    req = engine.inputs.process(PROMPT, GREEDY, "solo")
    memo = solo._plan(req)
    bpb = engine.cache.bytes_per_block
    expected = blocks_for_bytes(memo.request_bytes, bpb) + blocks_for_bytes(memo.draft_kv, bpb)
    assert solo.accepts(req)
    free0 = bm.num_free_blocks
    solo.start(req)
    assert free0 - bm.num_free_blocks == expected == solo.reserved_blocks() == bm.num_reserved
    gauges = engine.gauges()
    assert gauges["spec_kv_blocks_reserved"][1] == expected
    assert gauges["spec_kv_bytes_reserved"][1] == expected * bpb >= memo.request_bytes + memo.draft_kv
    assert gauges["spec_memory_added_bytes"][1] == memo.spec_bytes
    assert "frugallm_spec_kv_blocks_reserved " in engine.metrics.render()
    during: list[int] = []
    assert run_solo(solo, during) == reference
    assert llm.spec_stats.rounds > 0
    assert during[:-1] and all(f == free0 - expected for f in during[:-1])  # held while it decodes
    assert bm.num_free_blocks == free0 and bm.num_reserved == 0 and solo.reserved_blocks() == 0
    assert engine.gauges()["spec_memory_added_bytes"][1] == 0
    bm.check()


def test_a_pool_too_small_to_speculate_decodes_plainly_with_the_same_output(path: str, reference: list[int]) -> None:
    spec = SPECS[1]
    _, big, solo = make(path, spec, num_blocks=256)
    req = big.inputs.process(PROMPT, GREEDY, "probe")
    memo = solo._plan(req)
    bpb = big.cache.bytes_per_block
    spec_need = blocks_for_bytes(memo.request_bytes, bpb) + blocks_for_bytes(memo.draft_kv, bpb)
    plain_need = big.block_manager.blocks_for(len(req.prompt_ids) + GREEDY.max_tokens)
    assert plain_need < spec_need
    llm, engine, _ = make(path, spec, num_blocks=spec_need - 1)  # holds the request, not its speculation
    a = AsyncLLM(engine).start()

    async def collect() -> list[int]:
        return [t async for out in a.generate(PROMPT, GREEDY) for t in out.token_ids]

    try:
        assert asyncio.run(collect()) == reference
        assert llm.spec_stats.memory_fallbacks == 1 and llm.spec_stats.rounds == 0  # the engine decoded it
        assert engine.gauges()["spec_memory_fallbacks"][1] == 1
        assert engine.block_manager.num_used_blocks == 0 and engine.block_manager.num_reserved == 0
    finally:
        a.shutdown()


def test_draft_blocks_go_back_while_the_server_is_busy_and_return_after(path: str, reference: list[int]) -> None:
    llm, engine, solo = make(path, SPECS[1], num_blocks=256)
    bm = engine.block_manager
    req = engine.inputs.process(PROMPT, GREEDY, "solo")
    assert solo.accepts(req)
    solo.start(req)
    toks = solo.step().token_ids + solo.step().token_ids  # prefill, then a speculative round
    held = solo.reserved_blocks()
    request_blocks = len(solo._request_blocks)
    assert solo._draft_blocks and held > request_blocks
    others = [engine.add_request(p, GREEDY) for p in ("the cat sat", "x y z", "abc def")]  # 4 > 2 sequences
    toks += solo.step().token_ids
    assert solo._draft_blocks is None and solo.reserved_blocks() == request_blocks  # given back, cache freed
    engine.run_to_completion()
    assert engine.scheduler.num_preemptions == 0 and not engine.requests and others
    rounds = llm.last_spec_stats.rounds
    toks += solo.step().token_ids
    assert solo.reserved_blocks() == held and llm.last_spec_stats.rounds == rounds + 1  # taken again, speculating
    toks += run_solo(solo)
    assert toks == reference and bm.num_reserved == 0
    bm.check()


def test_no_blocks_for_the_draft_means_plain_steps_with_the_same_output(path: str, reference: list[int]) -> None:
    llm, engine, solo = make(path, SPECS[1], num_blocks=256)
    bm = engine.block_manager
    req = engine.inputs.process(PROMPT, GREEDY, "solo")
    assert solo.accepts(req)
    solo.start(req)
    toks = solo.step().token_ids
    solo._release_draft()  # as after a busy stretch; then the pool runs dry
    squatter = bm.reserve(bm.num_free_blocks)
    assert squatter is not None
    for _ in range(3):
        toks += solo.step().token_ids
    assert llm.spec_stats.memory_gated_steps == 3 and llm.last_spec_stats.rounds == 0
    bm.unreserve(squatter)
    toks += run_solo(solo)
    assert toks == reference and llm.last_spec_stats.rounds > 0 and bm.num_reserved == 0


def test_the_engine_needing_blocks_takes_the_drafts_back(path: str) -> None:
    """One engine sequence (not busy by count) whose remaining need exceeds the free blocks: the draft gives
    its blocks back rather than let the engine preempt."""
    llm, engine, solo = make(path, SPECS[1], num_blocks=256)
    bm = engine.block_manager
    req = engine.inputs.process(PROMPT, GREEDY, "solo")
    assert solo.accepts(req)
    solo.start(req)
    solo.step()
    solo.step()
    assert solo._draft_blocks
    engine.add_request("the cat sat on the mat", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    need = bm.blocks_for(len(llm.tokenizer.encode("the cat sat on the mat")) + 8)
    squatter = bm.reserve(bm.num_free_blocks - need + 1)  # leave one block less than the engine needs
    assert squatter is not None
    solo.step()
    assert solo._draft_blocks is None and bm.num_free_blocks >= need
    bm.unreserve(squatter)
    engine.run_to_completion()
    assert engine.scheduler.num_preemptions == 0
    run_solo(solo)
    assert bm.num_reserved == 0


def test_a_busy_server_takes_the_solo_request_into_its_batch_with_every_block_back(path: str,
                                                                                   reference: list[int]) -> None:
    llm, engine, solo = make(path, SPECS[1], num_blocks=256, handoff=True)
    bm = engine.block_manager
    req = engine.inputs.process(PROMPT, GREEDY, "solo")
    assert solo.accepts(req)
    solo.start(req)
    toks = solo.step().token_ids + solo.step().token_ids  # prefill, then a speculative round
    assert solo.reserved_blocks() > 0 and llm.last_spec_stats.rounds == 1
    others = [engine.add_request(p, GREEDY) for p in ("the cat sat", "x y z", "abc def")]  # 4 > 2 sequences
    toks += solo.step().token_ids  # a plain step (gated), then the hand-off
    assert not solo.running and solo.handoffs == 1 and bm.num_reserved == 0 and "solo" in engine.requests
    while engine.has_unfinished_requests():
        toks += [t for out in engine.step() if out.request_id == "solo" for t in out.token_ids]
    assert toks == reference and others and engine.scheduler.num_preemptions == 0
    assert not engine.requests and bm.num_used_blocks == 0
    bm.check()


def test_concurrent_requests_beside_a_speculating_one_keep_outputs_and_preempt_nothing(path: str) -> None:
    """Through the server's engine thread: a lone request speculates with its draft's blocks reserved, three more
    arrive (the draft's blocks go back, the solo one decodes plainly), all outputs are the plain greedy ones, the
    engine preempts nothing and every reserved block is back at the end. The pool holds the four requests and the
    solo one's cache, not the draft's too."""
    prompts = [PROMPT, "the cat sat on the mat", "x y z x y z x", "abc def abc"]
    long = SamplingParams(max_tokens=160, temperature=0, ignore_eos=True)  # still decoding when the others come
    params = [long, GREEDY, GREEDY, GREEDY]
    plain = LLM(path, dtype="float32", device="cpu")
    refs = [plain.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    _, big, solo = make(path, SPECS[1], num_blocks=256)
    memo = solo._plan(big.inputs.process(PROMPT, long, "probe"))
    bpb = big.cache.bytes_per_block
    engine_need = sum(big.block_manager.blocks_for(len(plain.tokenizer.encode(p)) + GREEDY.max_tokens + 1)
                      for p in prompts[1:])
    llm, engine, _ = make(path, SPECS[1], num_blocks=engine_need + blocks_for_bytes(memo.request_bytes, bpb)
                          + blocks_for_bytes(memo.draft_kv, bpb))
    a = AsyncLLM(engine).start()
    a.solo.handoff = False  # the gated path: the solo request stays beside the engine, its draft's blocks go back
    gates: list[bool] = []
    gate = llm.spec_gate
    llm.spec_gate = lambda: gates.append(gate()) or gates[-1]

    async def collect(p: str, sp: SamplingParams = GREEDY) -> list[int]:
        return [t async for out in a.generate(p, sp) for t in out.token_ids]

    async def main() -> list[list[int]]:
        first = asyncio.ensure_future(collect(prompts[0], long))
        while not gates:  # the first runs solo
            await asyncio.sleep(0.001)
        return [await first, *await asyncio.gather(*(collect(p) for p in prompts[1:]))]

    try:
        assert asyncio.run(main()) == refs
        assert True in gates and False in gates and engine.scheduler.num_preemptions == 0
        assert engine.block_manager.num_reserved == 0 and engine.block_manager.num_used_blocks == 0
        engine.block_manager.check()
    finally:
        a.shutdown()
