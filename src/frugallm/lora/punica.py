"""The batched multi-adapter product (Punica's BGMV, in a dense form for CPUs).

Every adapter loaded in a module lives in one slot of a stacked pool: ``a_pool [S * r, in]`` (slot ``s`` is rows
``[s * r, (s + 1) * r)``, zero-padded to the pool rank ``r``) and ``b_pool [out, S * r]``. A batch whose rows use
slots in ``[lo, hi)`` (any mix, rows with none included) runs as two GEMMs over that slot range with a per-row
slot mask between them:

    xa = x @ a_pool[lo*r:hi*r].T            [M, (hi-lo) * r]   every row against every slot in range
    xa *= mask (row's own slot only)        [M, hi-lo, r]
    y  = xa @ b_pool[:, lo*r:hi*r].T        [M, out]

No per-row gather copies the weights and no Python loop runs per adapter: each slot's factors are read once per
step (what a decode step on a memory-bound CPU pays for), the wasted FLOPs are the other slots' ``r`` columns of
each row (small next to the base linear for ranks <= 64). Slices of the pools are views (``b_pool``'s columns
have a leading dimension of ``S * r``, which the GEMM reads in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraBatch:
    """Which slot each activation row of the next forward uses (built by ``LoraManager.bind``).

    ``mask [M, hi - lo]``: 1 where row ``m`` uses slot ``lo + j`` (rows with no adapter are all zero), in the
    pools' dtype; ``index [M]``: the slot per row, ``S`` (the identity row of DoRA scales) for rows with none;
    ``dora``: some slot in range is a DoRA adapter.
    """

    mask: torch.Tensor
    index: torch.Tensor
    lo: int
    hi: int
    dora: bool


def bgmv(x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor, batch: LoraBatch, rank: int) -> torch.Tensor:
    """``x [M, in]`` -> ``[M, out]``: each row's own slot's ``x @ A.T @ B.T`` (zero for rows with no adapter)."""
    lo, hi = batch.lo * rank, batch.hi * rank
    xa = x @ a_pool[lo:hi].T
    xa = (xa.view(x.shape[0], batch.hi - batch.lo, rank) * batch.mask[:, :, None]).view(x.shape[0], hi - lo)
    return xa @ b_pool[:, lo:hi].T
