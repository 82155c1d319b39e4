"""Token bitmasks: bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed (llguidance's and xgrammar's
layout)."""

from __future__ import annotations

import torch

_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set disallowed tokens' logits to ``-inf`` in place.

    ``logits``: ``[S, vocab]`` (fp32, any device); ``bitmask``: ``[len(rows), W]`` int32 on the CPU with
    ``32 * W >= vocab``; ``rows``: the logits row each bitmask row applies to.
    """
    vocab = logits.shape[-1]
    allowed = ((bitmask[:, :, None] >> _BITS) & 1).view(len(rows), -1)[:, :vocab].bool()
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed.to(logits.device), float("-inf"))
