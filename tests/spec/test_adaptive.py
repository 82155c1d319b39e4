"""The adaptive controller: draft length follows acceptance; speculation switches off when it does not pay and
comes back when it does."""

from __future__ import annotations

from frugallm.spec.adaptive import PROBE_START, AdaptiveK


def run_rounds(ctrl: AdaptiveK, rounds: int, accept: float, t_row: float = 0.05) -> list[int]:
    """Simulate ``rounds`` decisions: a plain step costs 1.0, a verify of r rows 1 + t_row * (r - 1); each draft
    token is kept with probability ``accept`` (deterministically: the mean run length, rounded down)."""
    ks = []
    for _ in range(rounds):
        k = ctrl.next_k()
        ks.append(k)
        if k == 0:
            ctrl.observe_plain(1.0)
            continue
        kept = min(k, int(accept / (1 - accept)))  # the mean run of kept drafts
        ctrl.observe_round(k, kept, 0.0, 1.0 + t_row * k)
    return ks


def test_first_step_measures_plain_then_speculates() -> None:
    ctrl = AdaptiveK(8)
    assert ctrl.next_k() == 0
    ctrl.observe_plain(1.0)
    assert ctrl.next_k() > 0


def test_high_acceptance_drafts_long_low_acceptance_switches_off_then_back_on() -> None:
    ctrl = AdaptiveK(8)
    ks = run_rounds(ctrl, 40, accept=0.9)
    assert ks[-1] >= 4 and ctrl.alpha > 0.7
    ks = run_rounds(ctrl, 60, accept=0.0)
    assert ctrl.alpha < 0.2
    assert ks[-20:].count(0) >= 15  # mostly plain steps (a probe now and then)
    ks = run_rounds(ctrl, 400, accept=0.9)
    assert ks[-10:].count(0) <= 1 and max(ks[-10:]) >= 4


def test_expensive_verify_switches_off_even_at_moderate_acceptance() -> None:
    ctrl = AdaptiveK(4)
    ks = run_rounds(ctrl, 60, accept=0.5, t_row=1.0)  # every extra row costs a full step: never pays
    assert ks[-30:].count(0) >= 25


def test_not_adaptive_always_drafts_k() -> None:
    ctrl = AdaptiveK(5, adaptive=False)
    assert set(run_rounds(ctrl, 20, accept=0.0)) == {5}


def test_probe_backoff_doubles() -> None:
    ctrl = AdaptiveK(4)
    run_rounds(ctrl, 200, accept=0.0, t_row=1.0)
    assert ctrl.backoff > PROBE_START


def test_rounds_that_measurably_lose_switch_off_whatever_the_model_predicts() -> None:
    # Verify looks cheap (the cost model predicts a gain) but each round's drafting takes 3 plain steps (a draft
    # model catching up): measured, rounds lose, so speculation goes off and the back-off grows.
    ctrl = AdaptiveK(4)
    ks = []
    for _ in range(300):
        k = ctrl.next_k()
        ks.append(k)
        if k == 0:
            ctrl.observe_plain(1.0)
        else:
            ctrl.observe_round(k, k - 1, 3.0, 1.0 + 0.05 * k)
    assert ks[-100:].count(0) >= 95
    assert ctrl.backoff > PROBE_START


def test_hopeless_costs_probe_only_at_the_longest_backoff() -> None:
    from frugallm.spec.adaptive import PROBE_MAX

    ctrl = AdaptiveK(4)
    run_rounds(ctrl, 40, accept=0.9, t_row=1.2)  # each extra verify row costs more than a plain step
    assert ctrl.ceiling() < 1.0 and ctrl.backoff == PROBE_MAX
