"""Engine metrics in the Prometheus text exposition format (no client library needed).

The engine thread records; the server thread renders. A lock keeps a scrape consistent.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable

PREFIX = "frugallm"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: Iterable[float]) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        n = f"{PREFIX}_{self.name}"
        lines = [f"# HELP {n} {self.help}", f"# TYPE {n} histogram"]
        acc = 0
        for le, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += c
            lines.append(f'{n}_bucket{{le="{"+Inf" if le == float("inf") else le}"}} {acc}')
        lines += [f"{n}_sum {self.sum}", f"{n}_count {self.count}"]
        return lines


class Counter:
    def __init__(self, name: str, help: str, label: str | None = None) -> None:
        self.name, self.help, self.label = name, help, label
        self.values: dict[str, float] = {} if label else {"": 0}

    def inc(self, amount: float = 1, label: str = "") -> None:
        self.values[label] = self.values.get(label, 0) + amount

    def render(self) -> list[str]:
        n = f"{PREFIX}_{self.name}_total"
        lines = [f"# HELP {n} {self.help}", f"# TYPE {n} counter"]
        for lab, v in sorted(self.values.items()):
            lines.append(f'{n}{{{self.label}="{lab}"}} {v}' if self.label else f"{n} {v}")
        return lines


def gauge(name: str, help: str, value: float) -> list[str]:
    n = f"{PREFIX}_{name}"
    return [f"# HELP {n} {help}", f"# TYPE {n} gauge", f"{n} {value}"]


class EngineMetrics:
    """What ``GET /metrics`` shows. Gauges are read live through ``gauges()`` (set by the engine)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft = Histogram("time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.tpot = Histogram("time_per_output_token_seconds", "Mean time between output tokens of a request.",
                              TPOT_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter("generation_tokens", "Tokens generated.")
        self.requests = Counter("request_success", "Finished requests by finish reason.", label="finished_reason")
        self.aborted = Counter("request_aborted", "Requests cancelled before finishing (client disconnects).")
        self.preemptions = Counter("num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.")
        self.prefix_queries = Counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = Counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self.gauges: Callable[[], dict[str, tuple[str, float]]] = dict

    def render(self) -> str:
        with self.lock:
            lines: list[str] = []
            for name, (help, value) in self.gauges().items():
                lines += gauge(name, help, value)
            for m in (self.ttft, self.tpot, self.e2e, self.prompt_tokens, self.generation_tokens, self.requests,
                      self.aborted, self.preemptions, self.prefix_queries, self.prefix_hits):
                lines += m.render()
        return "\n".join(lines) + "\n"
