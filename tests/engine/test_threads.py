"""ThreadGovernor on a simulated machine: a fake clock, step times and idle cores per thread count and phase."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from frugallm.engine.threads import ThreadGovernor, adaptive_threads_enabled


class Machine:
    """Decode steps whose time depends on the thread count and on whether other processes are busy."""

    def __init__(self, step_time: Callable[[int, bool], float], cores: int = 2) -> None:
        self.step_time, self.cores = step_time, cores
        self.now = 0.0
        self.idle = 0.0
        self.busy = False  # other processes keep every core busy
        self.calls: list[int] = []
        self.gov = ThreadGovernor(cores, clock=lambda: self.now, set_threads=self.calls.append,
                                  idle_seconds=lambda: self.idle)

    def run(self, steps: int, key: object = None) -> None:
        for _ in range(steps):
            dt = self.step_time(self.gov.threads, self.busy)
            self.now += dt
            if not self.busy:  # our threads use `threads` cores; the rest sit idle
                self.idle += dt * (self.cores - self.gov.threads)
            self.gov.step(key)


def contended(threads: int, busy: bool) -> float:
    # Measured shape (2 cores, load average 6): 2 threads 10-20x slower than 1 when the cores are taken.
    if busy:
        return {1: 0.03, 2: 0.4}[threads]
    return {1: 0.022, 2: 0.014}[threads]


def test_a_quiet_machine_keeps_its_thread_count() -> None:
    jitter = [1.0, 1.2, 0.9, 1.1, 1.3, 0.95]
    i = iter(range(10**6))
    m = Machine(lambda t, busy: 0.014 * jitter[next(i) % len(jitter)])
    m.run(2000)
    # One window at 1 thread after the first (calibration), lost; then nothing.
    assert m.calls == [1, 2] and m.gov.threads == 2 and m.gov.switches == 0


def test_a_machine_crowded_from_the_start() -> None:
    m = Machine(contended)
    m.busy = True
    m.run(100)
    assert m.calls == [1] and m.gov.threads == 1 and m.gov.switches == 1


def test_fewer_threads_under_contention_and_all_again_after() -> None:
    m = Machine(contended)
    m.run(100)
    assert m.calls == [1, 2]  # the calibration window, lost
    m.busy = True
    m.run(200)
    assert m.gov.threads == 1  # one slow window, then the try of 1 thread kept
    assert m.calls == [1, 2, 1]  # the cores are not idle while crowded: 2 threads are not tried again
    t0 = m.now
    m.run(200)
    assert m.now - t0 < 200 * 0.031  # it stayed at the fast count
    m.busy = False
    m.run(400)
    assert m.gov.threads == 2 and m.calls[-1] == 2  # the idle core was noticed and taken back
    assert m.calls == [1, 2, 1, 2] and m.gov.switches == 2


def test_a_slowdown_that_fewer_threads_do_not_fix_keeps_the_count() -> None:
    slow = [False]

    def longer_context(threads: int, busy: bool) -> float:  # every step slower, and 1 thread slower still
        return (0.03 if slow[0] else 0.014) * (1.5 if threads == 1 else 1.0)

    m = Machine(longer_context)
    m.run(80)
    slow[0] = True
    m.run(400)
    assert m.calls == [1, 2, 1, 2]  # calibration, then one try of 1 thread, lost; the slower pace is the new baseline
    assert m.gov.threads == 2 and m.gov.switches == 0


def test_steps_of_other_shapes_and_pauses_are_not_mixed() -> None:
    m = Machine(lambda t, busy: 0.01)
    m.run(40, key=1)
    assert m.calls == [1, 2]  # calibration (1 thread is no faster here)
    m.step_time = lambda t, busy: 0.08  # batch 8: 8x the time per step, not a slowdown
    m.run(40, key=8)
    assert m.calls == [1, 2]
    m.now += 5.0  # a prefill between decode steps
    m.gov.pause()
    m.run(40, key=8)
    assert m.calls == [1, 2]


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False), ("off", False)])
def test_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, on: bool) -> None:
    if value is None:
        monkeypatch.delenv("FRUGALLM_ADAPTIVE_THREADS", raising=False)
    else:
        monkeypatch.setenv("FRUGALLM_ADAPTIVE_THREADS", value)
    assert adaptive_threads_enabled() is on


def test_llm_times_each_decode_step(tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    from frugallm import LLM, SamplingParams

    monkeypatch.setenv("FRUGALLM_ADAPTIVE_THREADS", "1")
    assert LLM(str(tiny_models.hf("llama")), threads=1).governor is None  # an explicit count is kept
    llm = LLM(str(tiny_models.hf("llama")))
    assert llm.governor is not None
    keys = []
    step = llm.governor.step
    monkeypatch.setattr(llm.governor, "step", lambda key=None: (keys.append(key), step(key))[1])
    llm.generate("a b", SamplingParams(max_tokens=26, ignore_eos=True, temperature=0))
    assert keys == [1] * 25  # one per decode step (the first token comes from the prefill), keyed by batch size
    assert llm.governor.windows == 3  # every step timed (25 // 8 windows)


def test_engine_times_its_decode_steps(tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    from frugallm import LLM, SamplingParams

    monkeypatch.setenv("FRUGALLM_ADAPTIVE_THREADS", "1")
    llm = LLM(str(tiny_models.hf("llama")))
    keys = []
    step = llm.governor.step
    monkeypatch.setattr(llm.governor, "step", lambda key=None: (keys.append(key), step(key))[1])
    llm.generate(["a b", "c d e", "f"], SamplingParams(max_tokens=10, ignore_eos=True, temperature=0))
    assert keys and set(keys) == {4}  # pure decode steps of 3 sequences (prefill steps are not timed)
