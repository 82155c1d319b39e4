"""SpecKV on the paged engine (``serve --kv speckv:...``, issue 14 #5 under batching): each prompt's last chunk is
computed in a pass of its own followed by the draft's lookahead tokens, whose queries vote; the kept slots are
compacted and the evicted blocks return to the pool; the greedy tokens are the single-stream path's (static cache,
same spec) under whole-prompt passes, chunked prefill and prefix-cache sharing."""

from __future__ import annotations

import dataclasses
import random

import pytest

from engine_runs import run_engine
from frugallm import LLM, SamplingParams
from frugallm.engine import model_runner
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.errors import InvalidRequestError
from frugallm.kv import paged_policy, parse_kv_spec, speckv

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def paths(tiny_models) -> tuple[str, str]:
    return str(tiny_models.gguf("llama", "F32")), str(tiny_models.gguf("qwen2", "F32"))  # same vocabulary


@pytest.fixture(scope="module")
def kv(paths: tuple[str, str]) -> str:
    return f"speckv:budget=0.25,window=4,lookahead=6,draft={paths[1]}"


@pytest.fixture(scope="module")
def llm(paths: tuple[str, str], kv: str) -> LLM:
    return LLM(paths[0], dtype="float32", device="cpu", kv=kv)


def prompts(llm: LLM, n: int = 4, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    v = llm.config.vocab_size
    shared = [rng.randrange(3, v) for _ in range(24)]  # odd prompts share a prefix (prefix-cache hits)
    return [(shared if i % 2 else []) + [rng.randrange(3, v) for _ in range(rng.randrange(40, 90))]
            for i in range(n)]


def test_paged_speckv_equals_the_single_stream_path(llm: LLM, paths: tuple[str, str], monkeypatch) -> None:
    static = [llm.generate([p], GREEDY)[0].token_ids for p in prompts(llm)]  # one prompt: the static cache
    full = LLM(paths[0], dtype="float32", device="cpu")
    assert static != [full.generate([p], GREEDY)[0].token_ids for p in prompts(llm)]  # the policy matters here
    calls: list[int] = []
    real = speckv.draft_lookahead
    monkeypatch.setattr(speckv, "draft_lookahead", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    starts: list[int] = []  # the first position of each lookahead pass (> 0: a last chunk after earlier ones)
    real_pass = model_runner.lookahead_pass
    monkeypatch.setattr(model_runner, "lookahead_pass",
                        lambda ev, m, ids, pos, *a, **k: starts.append(int(pos[0, 0])) or real_pass(ev, m, ids, pos,
                                                                                                     *a, **k))
    for cfg in (EngineConfig(num_blocks=128, block_size=4),
                EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=24, max_num_seqs=4),  # chunked
                EngineConfig(num_blocks=20, block_size=8, max_num_batched_tokens=96, max_num_seqs=3)):  # a tight pool
        engine = LLMEngine(llm, cfg)
        outs = run_engine(engine, prompts(llm), GREEDY)
        assert [o[0].token_ids for o in outs] == static
    assert calls and set(calls) == {6}  # every prompt pass ran the draft's lookahead
    assert 0 in starts and any(st > 0 for st in starts)  # whole prompts, and last chunks (chunking, prefix hits)


def test_evicted_blocks_return_to_the_pool(llm: LLM, kv: str) -> None:
    engine = LLMEngine(llm, EngineConfig(num_blocks=64, block_size=4))
    p = prompts(llm, 1)[0]
    rid = engine.add_request(p, GREEDY)
    seq = engine.requests[rid].seqs[0]
    engine.step()  # the whole prompt with the lookahead, compaction, the first token
    keep = parse_kv_spec(kv).evictor.prefill_keep(len(p), 0, llm.config.num_layers)
    bm = engine.block_manager
    assert keep < len(p) and seq.num_evicted == len(p) - keep and bm.num_slots(seq) == keep
    assert bm.num_used_blocks == bm.blocks_for(keep)  # not blocks_for(len(p)), nor the lookahead's
    engine.run_to_completion()
    assert bm.num_used_blocks == 0
    bm.check()


def test_speckv_pages_and_needs_its_draft_loaded(paths: tuple[str, str], kv: str) -> None:
    assert paged_policy(kv) is not None
    engine = LLMEngine(LLM(paths[0], dtype="float32", device="cpu"), EngineConfig(num_blocks=32, block_size=4))
    with pytest.raises(InvalidRequestError, match="no draft model is loaded"):
        engine.add_request([5, 6, 7, 8], GREEDY, kv="speckv:budget=0.5")


def test_serve_loads_the_draft_its_kv_names(paths: tuple[str, str], kv: str) -> None:
    """``serve --kv speckv:...,draft=D``: the served LLM has D registered, so the engine's requests run."""
    from frugallm.cli import build_parser
    from frugallm.serve.commands import build_engine_config, load_served_llm

    base = ["serve", "--model", paths[0], "--dtype", "float32", "--device", "cpu"]
    args = build_parser().parse_args([*base, "--kv", kv])
    llm = load_served_llm(args)
    assert llm.kv_draft is not None
    engine = LLMEngine(llm, dataclasses.replace(build_engine_config(args), num_blocks=64, kv_memory_gb=1.0))
    outs = run_engine(engine, prompts(llm, 2), GREEDY)
    assert all(len(o[0].token_ids) == GREEDY.max_tokens for o in outs)
    plain = build_parser().parse_args([*base, "--kv", "snapkv"])
    assert load_served_llm(plain).kv_spec is None  # other policies: the engine's alone, no draft
