"""Single-prompt ``LLM.generate`` / ``LLM.stream`` run on the paged engine's loop, with the contiguous loop's results.

The reference is ``SoloRunner._run`` (the contiguous-cache loop KV policies and speculation still use): the same
tokens and the same log-probabilities to the last bit, in fp32 and in bf16 (the engine's pool then keeps the fp32
keys/values the contiguous loop has, ``EngineConfig.exact_kv``).
"""

from __future__ import annotations

import pytest
import torch

from engine_runs import prompts_for
from frugallm import LLM, SamplingParams
from frugallm.engine.llm_engine import LLMEngine
from frugallm.engine.sequence import RequestOutput

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def llm(tiny_models, request) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype=request.param, device="cpu")


def solo(llm: LLM, prompt: list[int], params: SamplingParams) -> RequestOutput:
    (seq,) = llm._sequences([prompt], params)
    for _ in llm._run([seq]):
        pass
    return llm._output(seq)


class Spy:
    """Counts engine steps and contiguous-loop runs of one LLM."""

    def __init__(self, llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps = self.solo_runs = 0
        step, run = LLMEngine.step, llm._run

        def counted_step(engine: LLMEngine) -> list:
            self.steps += 1
            return step(engine)

        def counted_run(seqs: list) -> object:
            self.solo_runs += 1
            return run(seqs)

        monkeypatch.setattr(LLMEngine, "step", counted_step)
        monkeypatch.setattr(llm, "_run", counted_run)


def test_generate_equals_the_contiguous_loop(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=3)
    for prompt in prompts_for(llm, 3):  # 9 to 48 tokens, 40 generated: many 16-slot blocks
        want = solo(llm, prompt, params)
        spy = Spy(llm, monkeypatch)
        got = llm.generate([prompt], params)[0]
        assert (spy.steps, spy.solo_runs) == (40, 0)  # one prefill, 39 decodes, all on the engine
        monkeypatch.undo()
        assert got.token_ids == want.token_ids
        assert got.logprobs == want.logprobs  # fp32 log-softmax values of every step, exactly
        assert got.prompt == want.prompt and got.finish_reason == want.finish_reason == "length"
        assert got.metrics["kv_cache_bytes"] == want.metrics["kv_cache_bytes"]


def test_sampled_generate_equals_the_contiguous_loop(llm: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    prompt = prompts_for(llm)[1]
    assert llm.generate([prompt], params)[0].token_ids == solo(llm, prompt, params).token_ids


def test_stream_yields_token_by_token(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    text = "the quick brown fox"
    want = llm.generate([text], params)[0]
    spy = Spy(llm, monkeypatch)
    deltas, at_step = [], []
    for delta in llm.stream(text, params):
        deltas.append(delta)
        at_step.append(spy.steps)
    assert spy.solo_runs == 0 and spy.steps == 16
    assert at_step == sorted(set(at_step))  # each delta comes out of its own step, before the next one runs
    assert len(deltas) > 1 and "".join(deltas) == want.text == llm.last_output.text
    m = llm.last_output.metrics
    assert m["output_tokens"] == 16 and m["ttft_s"] > 0 and m["tpot_s"] > 0
    assert llm.last_output.token_ids == want.token_ids


def test_policies_speculation_and_static_batching_keep_the_contiguous_loop(
        tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tiny_models.hf("llama"))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for kwargs in ({"kv": "snapkv:budget=0.5"}, {"spec": "ngram:k=4"}, {"batching": False}):
        llm = LLM(path, dtype="float32", device="cpu", **kwargs)
        spy = Spy(llm, monkeypatch)
        llm.generate(["one two three four five six"], params)
        assert (spy.steps, spy.solo_runs) == (0, 1), kwargs
        monkeypatch.undo()


def test_exact_kv_pool(llm: LLM) -> None:
    from frugallm.engine.batched import batch_config

    engine = LLMEngine(llm, batch_config(llm, [[1, 2, 3]], [SamplingParams(max_tokens=4)], exact_kv=True))
    assert engine.cache.k[0].dtype == llm.kv_dtype == torch.float32
