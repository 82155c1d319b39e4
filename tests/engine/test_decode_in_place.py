"""The runner's in-place passes (``PagedKVCache.bind_run``): bit-identical logits to the gather path (``bind``).

Each scenario runs the same requests through two engines on one tiny fp32 model, one with the in-place decode and
one without (``ModelRunner.in_place_decode = False``), and compares every sampled logits row exactly: across block
boundaries, with sequences joining and leaving, with prefix-cache hits and with preemption.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine_runs import prompts_for
from frugallm import LLM, SamplingParams
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.engine.paged_cache import PagedKVCache
from frugallm.engine.scheduler import SchedulerOutput

pytestmark = pytest.mark.usefixtures("one_thread")

Script = Callable[[LLMEngine, int], None]  # adds requests before a given step


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run(llm: LLM, config: EngineConfig, script: Script, in_place: bool) -> tuple[LLMEngine, dict]:
    """Run ``script``'s requests to completion; returns the engine and {(request, choice, position): logits row}."""
    engine = LLMEngine(llm, config)
    engine.runner.in_place_decode = in_place
    logits: dict[tuple[str, int, int], torch.Tensor] = {}
    inner = engine.runner.run

    def record(out: SchedulerOutput) -> tuple[list[int], torch.Tensor | None]:
        rows, lg = inner(out)
        for r, i in enumerate(rows):
            s = out.seqs[i]
            logits[(s.request.request_id, s.index, s.num_computed_tokens + out.num_new[i])] = lg[r].clone()
        return rows, lg

    engine.runner.run = record  # type: ignore[method-assign]
    step = 0
    script(engine, step)
    while engine.has_unfinished_requests() or step < 3:  # a script may add requests after an idle step
        engine.step()
        engine.block_manager.check()
        step += 1
        script(engine, step)
    assert engine.block_manager.num_used_blocks == 0
    return engine, logits


def assert_identical(llm: LLM, config: EngineConfig, script: Script) -> LLMEngine:
    fast, got = run(llm, config, script, True)
    slow, want = run(llm, config, script, False)
    assert slow.runner.num_in_place == 0
    assert fast.runner.num_in_place > 0, "the scenario never decoded in place"
    assert got.keys() == want.keys()
    for key, row in want.items():
        assert torch.equal(got[key], row), f"request {key[0]} at position {key[2]}"
    return fast


def test_one_sequence_across_block_boundaries(llm: LLM) -> None:
    prompt = prompts_for(llm)[0]

    def script(engine: LLMEngine, step: int) -> None:
        if step == 0:
            engine.add_request(prompt, greedy(23))

    fast = assert_identical(llm, EngineConfig(num_blocks=32, block_size=4), script)
    assert fast.runner.num_in_place == 23  # the prompt, then every decode step


def test_sequences_joining_and_leaving(llm: LLM) -> None:
    """A decodes alone in its one block while B, C join (their prefill in the same step as A's decode) and leave."""
    ps = prompts_for(llm, 6, seed=1)

    def script(engine: LLMEngine, step: int) -> None:
        if step == 0:
            engine.add_request(ps[0][:5], greedy(10))
        elif step in (3, 5):
            engine.add_request(ps[step // 2], greedy(2 + step))

    assert_identical(llm, EngineConfig(num_blocks=64, block_size=16), script)


def test_prefix_cache_hits(llm: LLM) -> None:
    shared = prompts_for(llm)[0][:12]

    def script(engine: LLMEngine, step: int) -> None:
        if step == 0:  # its three full blocks, computed and cached; no fourth (its one token is not computed)
            engine.add_request(shared, greedy(1))
        elif step == 2:  # it has finished: the next reuses those blocks, and takes the one after them
            engine.add_request(shared + [7], greedy(9))

    fast = assert_identical(llm, EngineConfig(num_blocks=32, block_size=4), script)
    assert fast.block_manager.prefix_hits == 12
    # The first's prompt; the second on the cached blocks: its last prompt token (a one-token chunk), 8 decodes.
    assert fast.runner.num_in_place == 10


def test_preemption(llm: LLM) -> None:
    """Two prompts fill the 4-block pool; A's next block preempts B, A finishes on blocks 0, 1, 3, 2 (gathered), then
    B recomputes its prompt and tokens on blocks 2, 3 and decodes there in place until its table takes block 1; both
    prompts' first passes ran in place too."""
    a, b = prompts_for(llm, 2, seed=2)

    def script(engine: LLMEngine, step: int) -> None:
        if step == 0:
            engine.add_request(a[:7], greedy(9))
            engine.add_request(b[:7], greedy(9))

    fast = assert_identical(llm, EngineConfig(num_blocks=4, block_size=4, max_num_seqs=2), script)
    assert fast.scheduler.num_preemptions == 1
    assert fast.runner.num_in_place == 5


def test_bind_run_needs_consecutive_blocks() -> None:
    cache = PagedKVCache(1, 8, 4, 1, 2, torch.float32, "cpu")
    assert cache.bind_run([3, 4, 5], 9)  # slots 0..9 live in blocks 3, 4, 5
    assert cache.bind_run([3, 4, 0], 7)  # the blocks of slots 0..7 only
    assert not cache.bind_run([3, 5, 6], 9)
    assert not cache.bind_run([3, 4, 6, 7], 12)
    assert cache.bind_run([3, 4, 5], 0, 10)  # a prompt from its first token
    assert not cache.bind_run([3, 4, 5], 2, 8)  # a later chunk of several tokens needs bind()'s offset causal mask
    k = torch.arange(2.0).view(1, 1, 1, 2)
    assert cache.bind_run([2, 3], 5)
    keys, values, mask = cache.update(0, k, k + 1)
    assert mask is None and keys.shape == (1, 1, 6, 2)
    assert torch.equal(cache.k[0][3, 1, 0], k.view(2)) and torch.equal(values[0, 0, 5], k.view(2) + 1)
