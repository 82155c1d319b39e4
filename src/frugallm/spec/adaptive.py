"""The adaptive controller: how many tokens to draft next round, or none (a plain decode step).

It measures, as the sequence runs: ``alpha``, the chance that a draft token is kept given the ones before it
were (decayed counts; a round keeping ``n`` of ``k`` is ``n`` successes and one failure if ``n < k``); the time
of a plain one-row step; the verify pass's time as a line in its row count (the rows after the first are
nearly free while decode is bound by weight reads); the draft's time per token. The expected tokens of a
round of ``k`` are ``1 + alpha + ... + alpha^k``, its cost ``verify(k + 1) + k * draft``; the controller picks
the ``k`` with the best rate and switches speculation off when no ``k`` beats plain decoding by
``MARGIN``, or when the rounds themselves, as measured, did not beat it (``measured``: tokens emitted per round
over its draft + verify time, in plain steps; it sees what the model of the costs misses, e.g. a draft model
catching up on the tokens decoded while speculation was off). While off it probes again after a back-off of plain
steps that doubles on each failed probe, and starts short again only once rounds measurably pay.

Shadow rounds (``observe_shadow``): a proposer that drafts for free (``Proposer.free``: prompt lookup) keeps
guessing while speculation is off, and the decoder checks each guess against the tokens the plain steps then
produce. For a deterministic draft that is exactly what verifying it would have kept (greedy: the same argmax;
sampling: the draft token is kept with probability ``p(x)``, which is also the chance the plain step samples it),
so the acceptance stays measured at no cost, and speculation comes back on as soon as it would pay (a code edit
reaching the part it copies from the prompt) instead of after the back-off. Not when even fully kept drafts would
not pay at the measured costs (``ceiling``): acceptance cannot help there. Shadow guesses are ``PROBE_K`` long,
so a copied span turns speculation on after a few plain steps.
"""

from __future__ import annotations

DECAY = 0.8  # per-round decay of the acceptance counts: about the last 5 rounds matter
MARGIN = 1.03  # speculate only when the model predicts at least this speedup
PROBE_START, PROBE_MAX = 8, 256  # plain steps before re-trying speculation, doubling up to the max
PROBE_K = 4  # drafts in a probe round
REMEASURE_EVERY = 64  # rounds between plain steps that refresh the plain-step time


class _Ema:
    def __init__(self, w: float = 0.2) -> None:
        self.w, self.value = w, None  # type: ignore[assignment]

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.w) * self.value + self.w * x


class AdaptiveK:
    """``next_k()`` before a round; ``observe_round`` / ``observe_plain`` after it. ``adaptive=False``: always
    ``k_max`` (still measured, for the stats)."""

    def __init__(self, k_max: int, adaptive: bool = True) -> None:
        self.k_max, self.adaptive = k_max, adaptive
        self.kept, self.failed = 1.0, 1.0  # prior alpha = 0.5
        self.t_plain = _Ema()
        self.t_verify: dict[int, _Ema] = {}  # rows -> time
        self.t_draft = _Ema()  # per drafted token
        self.off_for = 0  # plain steps left before the next probe
        self.backoff = PROBE_START
        self.since_plain = 0
        self.probe = False
        self.measured = _Ema(0.3)  # measured speedup of recent rounds (tokens x plain step time / round time)
        self.shadow_ok = False  # off, but kept drafts would pay at these costs: shadow rounds may turn it back on
        self.shadow_kept, self.shadow_failed = 0.0, 0.5  # decayed acceptance counts of shadow rounds since then

    @property
    def alpha(self) -> float:
        return self.kept / (self.kept + self.failed)

    def verify_time(self, rows: int) -> float:
        """A line anchored at the plain step (one row): ``t1 + slope * (rows - 1)``, the slope averaged over the
        measured verify sizes and never negative (a verify pass never costs less than a plain step)."""
        t1 = self.t_plain.value
        pts = [(r, e.value) for r, e in self.t_verify.items() if e.value is not None]
        if t1 is None:
            return 1.0 if not pts else min(t for _, t in pts)
        if not pts:
            return t1 * (1 + 0.05 * (rows - 1))  # before any verify pass: a guess (extra rows ~5% each)
        slope = max(0.0, sum((t - t1) / (r - 1) for r, t in pts) / len(pts))
        return t1 + slope * (rows - 1)

    def expected_speedup(self, k: int, alpha: float | None = None) -> float:
        """Tokens per second of rounds of ``k`` over those of plain steps, under the current measurements (or
        acceptance ``alpha``)."""
        a = self.alpha if alpha is None else alpha
        tokens = sum(a**i for i in range(k + 1))
        cost = self.verify_time(k + 1) + k * (self.t_draft.value or 0.0)
        plain = self.t_plain.value if self.t_plain.value is not None else self.verify_time(1)
        return tokens * plain / cost

    def ceiling(self) -> float:
        """The best speedup any ``k`` could give if every draft were kept, under the measured costs."""
        a, self.kept, self.failed = (self.kept, self.failed), 1.0, 0.0
        try:
            return self.best_k()[1]
        finally:
            self.kept, self.failed = a

    def best_k(self, alpha: float | None = None) -> tuple[int, float]:
        return max(((k, self.expected_speedup(k, alpha)) for k in range(1, self.k_max + 1)), key=lambda t: t[1])

    def next_k(self) -> int:
        if not self.adaptive:
            return self.k_max
        if self.t_plain.value is None or self.since_plain >= REMEASURE_EVERY:
            return 0  # measure (or refresh) the plain step this round
        if self.off_for > 0:
            shadow = self.shadow_kept / (self.shadow_kept + self.shadow_failed)
            if self.shadow_ok and self.best_k(shadow)[1] >= MARGIN:
                self.off_for, self.probe = 0, False  # the guesses made while off would have paid: back on with
                self.kept, self.failed = self.shadow_kept, self.shadow_failed  # their acceptance; the rounds from
                self.measured.value = None  # here decide (their measured rate)
                return self.best_k()[0]
            self.off_for -= 1
            self.probe = self.off_for == 0
            return 0
        if self.probe:  # a probe after the back-off: forget the old acceptance (a weak pessimistic prior) and the
            self.probe = False  # measured gain, so this round alone decides whether speculation is back on
            self.kept, self.failed = 0.0, 0.5
            self.measured.value = None
            return min(self.k_max, PROBE_K)
        if not self.t_verify:  # the verify pass's cost is a guess until measured: a moderate first round
            return min(self.k_max, PROBE_K)
        k, gain = self.best_k()
        slow = self.measured.value is not None and self.measured.value < MARGIN
        if (gain < MARGIN or slow) and self.t_verify:
            self.off_for = self.backoff  # off for a while; a probe afterwards uses the best k then
            self.shadow_ok = self.ceiling() >= MARGIN  # kept drafts would pay: shadow rounds can tell
            self.shadow_kept, self.shadow_failed = 0.0, 0.5  # only they decide (the probe's pessimistic prior)
            # Not even all drafts kept would pay at these costs: probe only at the longest back-off.
            self.backoff = PROBE_MAX if self.ceiling() < MARGIN else min(2 * self.backoff, PROBE_MAX)
            return 0
        return k

    def observe_round(self, k: int, kept: int, t_draft: float, t_verify: float) -> None:
        """A round drafted ``k`` tokens in ``t_draft`` s, verified them in ``t_verify`` s, and kept ``kept``."""
        self.kept = DECAY * self.kept + kept
        self.failed = DECAY * self.failed + (1 if kept < k else 0)
        self.t_verify.setdefault(k + 1, _Ema()).add(t_verify)
        self.t_draft.add(t_draft / k)
        self.since_plain += 1
        if self.t_plain.value is not None and t_draft + t_verify > 0:
            self.measured.add((kept + 1) * self.t_plain.value / (t_draft + t_verify))
        if self.adaptive and self.best_k()[1] >= MARGIN and (self.measured.value or 0.0) >= MARGIN:
            self.backoff = PROBE_START  # paying again: the next switch-off starts from a short back-off

    def observe_shadow(self, k: int, kept: int) -> None:
        """While off: a free draft of ``k`` tokens of which the plain steps that followed matched the first
        ``kept`` (see the module docstring). Counts as a round's acceptance, costs nothing."""
        self.shadow_kept = DECAY * self.shadow_kept + kept
        self.shadow_failed = DECAY * self.shadow_failed + (1 if kept < k else 0)

    @property
    def off(self) -> bool:
        """Speculation is switched off by the controller (plain steps until a probe or a shadow round says on)."""
        return self.adaptive and self.off_for > 0

    def observe_plain(self, t: float) -> None:
        self.t_plain.add(t)
        self.since_plain = 0

    def observe_empty(self) -> None:
        """The proposer had nothing to offer (no n-gram match): a plain step follows, nothing learned."""
