"""Verification: greedy acceptance, and rejection sampling whose output follows the target distribution
(chi-square on a small vocabulary, for sampled drafts, deterministic drafts and a draft equal to the target)."""

from __future__ import annotations

import pytest
import torch

from frugallm import SamplingParams
from frugallm.spec.verify import greedy_accept, rejection_accept, target_probs

V = 6
TRIALS = 12000


def chisquare_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit: P(X >= stat) for X ~ chi2(len - 1), as scipy.stats.chisquare."""
    counts, expected = counts.double(), expected.double()
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(counts.numel() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def test_greedy_accept_keeps_the_matching_prefix() -> None:
    logits = torch.full((4, V), -1.0)
    for row, best in enumerate([2, 3, 1, 5]):
        logits[row, best] = 1.0
    assert greedy_accept(logits, [2, 3, 1]) == (3, 5)  # all kept, then the last row's token
    assert greedy_accept(logits, [2, 4, 1]) == (1, 3)  # second draft wrong: replaced by row 1's argmax
    assert greedy_accept(logits, [0, 3, 1]) == (0, 2)
    assert greedy_accept(logits[:1], []) == (0, 2)


def test_target_probs_match_the_sampler_filters() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    p = target_probs(logits, SamplingParams(temperature=0.5, top_k=2))
    assert p[0, 2:].sum() == 0
    assert torch.allclose(p[0, :2], (logits[0, :2] / 0.5).softmax(-1))


def _dists(seed: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(k + 1, V, generator=g) ** 3
    q = torch.rand(k, V, generator=g) ** 3
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


@pytest.mark.parametrize("draft", ["sampled", "deterministic", "equal"])
def test_rejection_sampling_output_is_the_target_distribution(draft: str) -> None:
    k = 2
    p, q = _dists(7, k)
    if draft == "equal":
        q = p[:k].clone()
    g = torch.Generator().manual_seed(123)
    first = torch.zeros(V)
    second = torch.zeros(V)  # the second token, given that the first equals draft 0 and was kept
    kept_total = 0
    for _ in range(TRIALS):
        if draft == "deterministic":
            drafts, qq = [2, 4], None
        else:
            drafts, qq = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)], q
        n, tok = rejection_accept(p, qq, drafts, g)
        out = [*drafts[:n], tok]
        kept_total += n
        first[out[0]] += 1
        if n >= 1 and len(out) > 1:
            second[out[1]] += 1
    for counts, probs in ((first, p[0]), (second, p[1])):
        assert chisquare_pvalue(counts, probs * float(counts.sum())) > 1e-3
    if draft == "equal":
        assert kept_total == k * TRIALS  # q == p: every draft is kept
