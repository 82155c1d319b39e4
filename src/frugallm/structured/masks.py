"""Token bitmasks: bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed (llguidance's and xgrammar's
layout)."""

from __future__ import annotations

import sys

import numpy as np
import torch

_BITS = torch.arange(32, dtype=torch.int32)
# (allowed - 1) * 2**23 is -2**23 = 0xFF800000 (float32 -inf) or 0 (+0.0): a penalty row of -inf / +0.0 built
# with integer ops only (masked_fill / where / log over 16 rows of a 49k vocabulary took 5-15x longer on the CPU).
_NEG_INF_BITS = 2**23


def _allowed(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """``[rows, vocab]`` 0/1 of the allowed tokens (uint8 or int32)."""
    if device.type == "cpu" and sys.byteorder == "little":  # numpy's C unpacking: bytes of a word, low first
        bits = np.unpackbits(bitmask.contiguous().numpy().view(np.uint8), axis=-1, bitorder="little")
        return torch.from_numpy(bits)[:, :vocab]
    words = bitmask.to(device, non_blocking=True)
    return ((words[:, :, None] >> _BITS.to(device)) & 1).view(words.shape[0], -1)[:, :vocab]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set disallowed tokens' logits to ``-inf`` in place (allowed ones are unchanged).

    ``logits``: ``[S, vocab]`` (fp32, any device); ``bitmask``: ``[len(rows), W]`` int32 on the CPU with
    ``32 * W >= vocab``; ``rows``: the logits row each bitmask row applies to (distinct).
    """
    vocab = logits.shape[-1]
    allowed = _allowed(bitmask, vocab, logits.device)
    penalty = (allowed.to(torch.int32) - 1).mul_(_NEG_INF_BITS).view(torch.float32)  # 0 -> -inf, 1 -> +0.0
    if rows == list(range(logits.shape[0])):
        logits.add_(penalty)
    else:
        logits.index_add_(0, torch.tensor(rows, device=logits.device), penalty)
