"""Speculation in the server (``serve --spec``, ``engine/spec_solo.py``): a request alone runs speculatively beside
the paged engine, others meanwhile go to the engine; every output is the plain greedy one; the solo request stops
speculating while the server holds more than the threshold; aborts and the engine's counters."""

from __future__ import annotations

import asyncio

import pytest

from frugallm import LLM, SamplingParams
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.engine.spec_solo import SoloSpec

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = ["hello world, hello world, hello", "the cat sat on the mat", "x y z x y z x", "abc def abc"]


@pytest.fixture(scope="module")
def path(tiny_models) -> str:
    return str(tiny_models.gguf("llama", "F32"))


@pytest.fixture(scope="module")
def plain_outputs(path: str) -> list:
    plain = LLM(path, dtype="float32", device="cpu")
    return [plain.generate(p, GREEDY)[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(plain_outputs: list) -> list[list[int]]:
    return [o.token_ids for o in plain_outputs]


def serve(path: str) -> tuple[LLM, AsyncLLM]:
    llm = LLM(path, dtype="float32", device="cpu")
    llm.set_spec("ngram:k=4:adaptive=off")  # what serve --spec does after loading
    return llm, AsyncLLM(LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4))).start()


async def collect(a: AsyncLLM, prompt: str, params: SamplingParams = GREEDY) -> tuple[list[int], str]:
    toks, text = [], ""
    async for out in a.generate(prompt, params):
        toks += out.token_ids
        text += out.text
    return toks, text


def test_a_lone_request_speculates_and_matches_plain_decoding(path: str, plain_outputs: list) -> None:
    llm, a = serve(path)
    try:
        assert isinstance(a.solo, SoloSpec)
        for p, ref in zip(PROMPTS, plain_outputs, strict=True):
            toks, text = asyncio.run(collect(a, p))
            assert toks == ref.token_ids and text == ref.text  # the streamed text concatenates to the final text
        assert llm.spec_stats.rounds > 0 and llm.spec_stats.drafted > 0
        assert a.solo.memory_bytes() > 0 and not a.solo.running
        assert a.engine.metrics.requests.values["length"] == len(PROMPTS)  # counted as the engine counts its own
    finally:
        a.shutdown()


@pytest.mark.parametrize("handoff", [True, False])
def test_concurrent_requests_go_to_the_engine_and_the_solo_one_joins_or_is_gated(path: str, reference: list[list[int]],
                                                                                 handoff: bool) -> None:
    llm, a = serve(path)
    a.solo.handoff = handoff
    gates: list[bool] = []
    gate = llm.spec_gate
    llm.spec_gate = lambda: gates.append(gate()) or gates[-1]

    async def main() -> list[list[int]]:
        res = await asyncio.gather(*(collect(a, p) for p in PROMPTS))
        return [t for t, _ in res]

    try:
        assert asyncio.run(main()) == reference
        # The first request ran solo; with the other three in the engine (4 > 2 sequences) it was handed to the
        # engine's batch (its tokens so far computed again there), or, without hand-off, it decoded plainly.
        if handoff:
            assert a.solo.handoffs == 1 and a.solo.gauges()["spec_handoffs"][1] == 1
        else:
            assert False in gates and a.solo.handoffs == 0
        assert not a.solo.running and a.engine.block_manager.num_reserved == 0
        assert not a.engine.requests and a.engine.block_manager.num_used_blocks == 0
    finally:
        a.shutdown()


def test_abort_and_requests_that_stay_on_the_engine(path: str, reference: list[list[int]]) -> None:
    llm, a = serve(path)

    async def cancelled() -> None:
        agen = a.generate(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        async for _ in agen:
            break  # the client goes away after the first output
        await agen.aclose()

    try:
        asyncio.run(cancelled())
        for _ in range(100):
            if not a.solo.running:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert not a.solo.running
        rounds = llm.spec_stats.rounds
        # logprobs need per-token history speculation does not keep: the engine serves it.
        toks, _ = asyncio.run(collect(a, PROMPTS[1], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                                    logprobs=1)))
        assert toks == reference[1] and llm.spec_stats.rounds == rounds
    finally:
        a.shutdown()
