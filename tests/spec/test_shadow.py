"""Shadow rounds: a free proposer (prompt lookup) keeps guessing while the controller has speculation off, the
guesses are checked against the plain steps' tokens, and speculation comes back as soon as they would pay (a code
edit reaching the span it copies) instead of after the back-off; greedy output stays the target's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from frugallm import LLM, SamplingParams
from frugallm.spec import Draft, Proposer, SpecConfig, SpecDecoder, SpecStats, decoder
from frugallm.spec.adaptive import PROBE_START, AdaptiveK

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "the cat sat on the mat"
START = 40  # output tokens after which the oracle's guesses are right


def switched_off(ctrl: AdaptiveK) -> None:
    """Measure a plain step and a cheap verify, then rounds that keep nothing until the controller turns off."""
    assert ctrl.next_k() == 0
    ctrl.observe_plain(1.0)
    for _ in range(20):
        k = ctrl.next_k()
        if k == 0:
            return
        ctrl.observe_round(k, 0, 0.0, 1.0 + 0.05 * k)
    raise AssertionError("never switched off")


def test_shadow_rounds_that_would_pay_turn_speculation_back_on_before_the_backoff() -> None:
    ctrl = AdaptiveK(8)
    switched_off(ctrl)
    assert ctrl.off and ctrl.shadow_ok
    assert ctrl.next_k() == 0  # nothing seen yet: still off
    ctrl.observe_shadow(4, 4)
    ctrl.observe_shadow(4, 4)
    assert ctrl.next_k() > 0 and not ctrl.off


def test_shadow_rounds_that_miss_keep_it_off() -> None:
    ctrl = AdaptiveK(8)
    switched_off(ctrl)
    for _ in range(PROBE_START - 2):
        ctrl.observe_shadow(4, 0)
        assert ctrl.next_k() == 0


def test_no_shadow_turn_on_when_even_kept_drafts_would_not_pay() -> None:
    ctrl = AdaptiveK(4)
    ctrl.next_k()
    ctrl.observe_plain(1.0)
    for _ in range(20):
        k = ctrl.next_k()
        if k == 0:
            break
        ctrl.observe_round(k, k, 0.0, 1.0 + 1.2 * k)  # each extra verify row costs more than a plain step
    assert ctrl.off and not ctrl.shadow_ok
    ctrl.observe_shadow(4, 4)
    assert ctrl.next_k() == 0


class LateOracle(Proposer):
    """Wrong guesses for the first ``START`` output tokens, then the target's own continuation (``reference``):
    a code edit's new signature, then the body it copies. ``free`` as the flag under test says."""

    name = "late-oracle"

    def __init__(self, prompt_len: int, reference: list[int], free: bool) -> None:
        self.prompt_len, self.reference, self.free = prompt_len, reference, free  # type: ignore[misc]

    def propose(self, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None) -> Draft:
        done = len(tokens) - self.prompt_len
        if done < START:
            return Draft([(tokens[-1] * 7 + i + 1) % 384 for i in range(k)])
        return Draft(self.reference[done:done + k])


class Clock:
    """The decoder's clock, advanced by the model calls it times: a plain step costs 1.0, a verify pass of r rows
    1 + 0.1 (r - 1) (the 1.5B model's shape), so the controller's decisions do not depend on the machine's load."""

    def __init__(self, model: Any) -> None:
        self.now, self.model = 0.0, model

    def perf_counter(self) -> float:
        return self.now

    def __call__(self, ids: torch.Tensor, *a: Any) -> torch.Tensor:
        self.now += 1.0 + 0.1 * (ids.shape[1] - 1)
        return self.model(ids, *a)


@torch.inference_mode()
def decode(llm: LLM, free: bool, reference: list[int], monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], SpecStats]:
    clock = Clock(llm.model)
    monkeypatch.setattr(decoder, "time", clock)
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    seq = llm._sequences([PROMPT], params)[0]
    n = len(seq.prompt_ids)
    cache = llm.make_cache(1, n + 140)
    logits = llm.model(torch.tensor([seq.prompt_ids]), torch.arange(n)[None], cache, "last")
    stats = SpecStats()
    dec = SpecDecoder(SpecConfig("ngram", k=6), LateOracle(n, reference, free), stats)
    for _ in dec.run(clock, cache, seq, llm.device, lambda: seq.append(int(logits[0].argmax()))):
        pass
    return seq.output_ids, stats


def test_free_proposer_resumes_speculation_early_and_output_is_unchanged(tiny_models,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(str(tiny_models.gguf("llama", "F32")), dtype="float32", device="cpu")
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))[0].token_ids
    shadowed, with_shadow = decode(llm, True, ref, monkeypatch)
    plain_out, without = decode(llm, False, ref, monkeypatch)
    assert shadowed == plain_out == ref
    assert with_shadow.shadow_rounds > 0 and without.shadow_rounds == 0
    assert with_shadow.plain_steps < without.plain_steps
    assert with_shadow.as_dict()["spec_shadow_rounds"] == with_shadow.shadow_rounds
