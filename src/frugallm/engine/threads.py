"""Fewer CPU threads while other processes compete for the cores, back to all of them when they stop.

Why: every op of a decode step is an OpenMP parallel region that ends in a barrier. When another process
keeps a core busy, one of our threads is often descheduled and the others wait for it, at every region
(a 135M decode step has ~200). Measured on 2 cores beside 4 busy processes (load average 6): 2 threads decoded
the default model at 2-3 tok/s, 1 thread at 23-48 tok/s (quiet machine, 2 threads: ~70 tok/s).

:class:`ThreadGovernor` watches the wall time of decode steps. After its first window it tries half the threads
for one window (a machine crowded from the start shows no change to react to); then it does nothing while steps
run as fast as they did before (a quiet machine: 8 steps at half the threads, once). When
a window of steps is ``slow_factor`` times slower than the best window seen at this thread count and batch
size, it tries half the threads for one window and keeps them if that window is faster; while below the
maximum it tries twice the threads now and then, when the cores it would add sat idle during the last window
(backing off exponentially while the try loses).

On by default where the thread count is torch's default (``LLM(threads=None)``); an explicit count is kept
as given; ``FRUGALLM_ADAPTIVE_THREADS=0`` turns it off.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch


def _idle_seconds() -> float:
    """CPU-seconds all cores spent idle since boot."""
    return float(psutil.cpu_times().idle)


def adaptive_threads_enabled() -> bool:
    """``FRUGALLM_ADAPTIVE_THREADS`` unset or not ``0``/``false``/``off``."""
    return os.environ.get("FRUGALLM_ADAPTIVE_THREADS", "1").strip().lower() not in ("0", "false", "off", "no")


@dataclass
class ThreadGovernor:
    """Picks the intra-op thread count from measured decode-step times. Call :meth:`step` after every decode
    step (``key``: what makes steps comparable, e.g. the batch size) and :meth:`pause` before work that is not a
    decode step (a prefill), so its time is not counted. Single-threaded: one governor per decode loop."""

    max_threads: int
    window: int = 8  # steps per measurement (their median)
    slow_factor: float = 1.5  # a window this much slower than the best at this count starts a try of fewer
    gain: float = 1.1  # a tried count is kept when its window is this much faster
    retry_windows: int = 8  # below the maximum, windows before trying more threads again (doubles on each loss)
    clock: Callable[[], float] = time.perf_counter
    set_threads: Callable[[int], None] = torch.set_num_threads
    idle_seconds: Callable[[], float] | None = _idle_seconds  # more threads are tried only when cores sit idle
    threads: int = field(init=False)
    switches: int = field(default=0, init=False)  # thread-count changes kept (for metrics and tests)
    windows: int = field(default=0, init=False)  # windows measured

    def __post_init__(self) -> None:
        self.max_threads = max(1, self.max_threads)
        self.threads = self.max_threads
        self._best: dict[tuple[int, object], float] = {}  # (threads, key) -> best window median
        self._times: list[float] = []
        self._key: object = None
        self._last: float | None = None
        self._trial: tuple[int, float] | None = None  # (previous count, its window median) while trying one
        self._idle_at: tuple[float, float] | None = None  # (clock, idle seconds) at the window's start
        self._calibrated = False
        self._up_wait = self._up_in = self.retry_windows

    def pause(self) -> None:
        """The next :meth:`step` times the interval from now (not from the last step): call it before a step
        when other work (a prefill, the consumer of the outputs) ran since the last one."""
        self._last = self.clock()

    def step(self, key: object = None) -> None:
        now = self.clock()
        last, self._last = self._last, now
        if last is None:
            return
        if key != self._key:  # steps of another shape: start the window again
            self._key, self._times = key, []
        if not self._times and self.idle_seconds is not None and self.threads < self.max_threads:
            self._idle_at = (last, self.idle_seconds())
        self._times.append(now - last)
        if len(self._times) < self.window:
            return
        median = statistics.median(self._times)
        self._times = []
        self.windows += 1
        self._decide(median)

    def _decide(self, median: float) -> None:
        here = (self.threads, self._key)
        if self._trial is not None:
            before, before_median = self._trial
            self._trial = None
            went_up = self.threads > before
            if median * self.gain <= before_median:  # the tried count is faster: keep it
                self.switches += 1
                self._best[here] = median
                if went_up:
                    self._up_wait = self.retry_windows
            else:
                self._use(before)
                if went_up:  # still crowded: wait longer before the next try
                    self._up_wait = min(self._up_wait * 2, 1024)
                else:  # fewer threads do not help: this slower pace is the new baseline at this count
                    self._best[(before, self._key)] = before_median
            self._up_in = self._up_wait
            return
        best = self._best.get(here)
        self._best[here] = median if best is None else min(best, median)
        if not self._calibrated:  # crowded from the start looks like no change: try half the threads once
            self._calibrated = True
            if self.threads > 1:
                self._try(max(1, self.threads // 2), median)
            return
        if best is not None and median > self.slow_factor * best and self.threads > 1:
            self._try(max(1, self.threads // 2), median)
        elif self.threads < self.max_threads:
            self._up_in -= 1
            want = min(self.max_threads, self.threads * 2)
            if self._up_in <= 0 and self._idle_cores() >= 0.5 * (want - self.threads):
                self._try(want, median)

    def _idle_cores(self) -> float:
        """Cores left idle during the window that just ended (inf when unknown: then only the try decides)."""
        if self.idle_seconds is None or self._idle_at is None:
            return float("inf")
        t0, idle0 = self._idle_at
        return (self.idle_seconds() - idle0) / max(self.clock() - t0, 1e-9)

    def _try(self, threads: int, median: float) -> None:
        self._trial = (self.threads, median)
        self._use(threads)

    def _use(self, threads: int) -> None:
        if threads != self.threads:
            self.threads = threads
            self.set_threads(threads)
        self._last = None  # the switch itself is not a step
