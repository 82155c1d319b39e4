"""Verification: which drafted tokens the target keeps, so that the output is exactly the target's.

Greedy: keep drafts while they equal the target's argmax; the first mismatch is replaced by the argmax, and
when every draft is kept the last row gives one more token. Sampling: standard speculative rejection
sampling (Leviathan et al. 2023, Chen et al. 2023): draft ``x ~ q`` is kept with probability
``min(1, p(x) / q(x))``; on rejection the token is drawn from ``norm(max(p - q, 0))``; every token is then
distributed exactly as ``p``, the target's filtered distribution. A deterministic draft is ``q = one-hot``.
"""

from __future__ import annotations

import torch

from frugallm.sampling import SamplingParams, filter_logits


def greedy_accept(logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """``logits [k + 1, vocab]`` of the verify pass (row ``i`` predicts the token after draft ``i - 1``).

    Returns ``(n, token)``: the first ``n`` drafts are kept and ``token`` follows them."""
    best = logits.argmax(-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return n, best[n]


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[rows, vocab]`` logits -> the probabilities ``sampling.pick_token`` would sample from, per row."""
    return torch.stack([filter_logits(row, params).softmax(-1) for row in logits])


def rejection_accept(
    p: torch.Tensor, q: torch.Tensor | None, drafts: list[int], generator: torch.Generator | None
) -> tuple[int, int]:
    """Speculative rejection sampling.

    ``p [k + 1, vocab]``: target probabilities (row ``i`` after draft ``i - 1``); ``q [k, vocab]``: the draft
    distributions the ``drafts`` were drawn from, or None for deterministic drafts. Returns ``(n, token)``."""
    if generator is not None:
        p = p.cpu()
        q = None if q is None else q.cpu()
    k = len(drafts)
    u = torch.rand(k, generator=generator, device=p.device).tolist() if k else []
    for i, x in enumerate(drafts):
        px = float(p[i, x])
        qx = 1.0 if q is None else float(q[i, x])
        if u[i] * qx < px:  # u < p/q without dividing (q(x) > 0: x was drawn from q)
            continue
        if q is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_(min=0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p <= q everywhere but x was rejected: only rounding gets here; fall back to p
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))
