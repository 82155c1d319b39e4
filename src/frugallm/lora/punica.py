"""The batched multi-adapter product (Punica's BGMV): every row of a batch times its own adapter's factors.

Every adapter loaded in a module lives in one slot of stacked pools, per part ``p`` of the module's output
(q/k/v, gate/up of a fused linear): ``a_pool [P, S * r, in]`` (slot ``s`` of part ``p`` is
``a_pool[p, s * r : (s + 1) * r]``, zero-padded to the pool rank ``r``), the ``B`` factors (k-major, scaling
folded in) and ``ranks [S, P]`` (int32: each slot's rank per part, 0 where the adapter leaves the part alone).

Two implementations of one product, ``y[m] += B_s (A_s x[m])`` with ``s = index[m]``, each with its ``B`` layout:

* :func:`bgmv_native` (CPU, fp32/bf16 pools, ``csrc/lora_bgmv.cpp``): one call per module; each row reads only its
  own slot's factors (shrink and expand fused, fp32 accumulate), DoRA's row scaling of the base output folded in.
  ``B`` in column tiles, ``b_tiles [S, T, r, 64]`` (:func:`tile_b`), so each slot's ``B`` is one sequential read.
* :func:`bgmv` (the torch path: CUDA, no compiler, fp16 pools): ``b_pool [S * r, out]``; for a batch whose rows use
  slots in ``[lo, hi)``, two GEMMs over that slot range with a per-row slot mask between them (no per-row gather,
  no loop over adapters; the wasted FLOPs are every row against the other slots' ``r`` columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugallm import native


@dataclass(frozen=True)
class LoraBatch:
    """Which slot each activation row of the next forward uses (built by ``LoraManager.bind``).

    ``mask [M, hi - lo]``: 1 where row ``m`` uses slot ``lo + j`` (rows with no adapter are all zero), in the
    pools' dtype (the torch path's); ``index [M]`` (int64): the slot per row, ``S`` (the identity row of DoRA
    scales) for rows with none; ``dora``: some slot in range is a DoRA adapter.
    """

    mask: torch.Tensor
    index: torch.Tensor
    lo: int
    hi: int
    dora: bool


def bgmv(x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor, batch: LoraBatch, rank: int) -> torch.Tensor:
    """The torch path for one part: ``x [M, in]``, ``a_pool [S * r, in]``, ``b_pool [S * r, n]`` (k-major, may be a
    column slice) -> ``[M, n]``: each row's own slot's ``x @ A.T @ B`` (zero for rows with no adapter)."""
    lo, hi = batch.lo * rank, batch.hi * rank
    xa = x @ a_pool[lo:hi].T
    xa = (xa.view(x.shape[0], batch.hi - batch.lo, rank) * batch.mask[:, :, None]).view(x.shape[0], hi - lo)
    return xa @ b_pool[lo:hi]


NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # of the pools, activations and outputs the kernel reads
TILE = 64  # output columns per tile of b_tiles (csrc/lora_bgmv.cpp's kTile)


def native_pools(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether pools of ``dtype`` on ``device`` run on the kernel (and so take its ``B`` layout)."""
    return device.type == "cpu" and dtype in NATIVE_DTYPES and native.usable("lora_bgmv")


def tiles(parts: list[int]) -> list[int]:
    """The first tile of each part in ``b_tiles`` and, last, the tile count: ``ceil(n / 64)`` tiles per part."""
    out = [0]
    for n in parts:
        out.append(out[-1] + -(-n // TILE))
    return out


def tile_b(b: torch.Tensor, rank: int) -> torch.Tensor:
    """A part's ``b [n, r']`` (``r' <= rank``) as its tiles ``[ceil(n / 64), rank, 64]`` (zero-padded)."""
    n, r = b.shape
    padded = b.new_zeros(-(-n // TILE) * TILE, rank)
    padded[:n, :r] = b
    return padded.view(-1, TILE, rank).transpose(1, 2)


def bgmv_native(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_tiles: torch.Tensor, index: torch.Tensor,
                ranks: torch.Tensor, parts: list[int], dora_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> None:
    """In place, every part at once: ``y [M, out] += B_s (A_s x[m])`` per row (``x [M, in]``; unit column
    strides; fp32 or bf16). With ``dora_scale [S (+1), out]`` (fp32), first ``y[m] = (y[m] - bias) *
    dora_scale[s] + bias`` (``bias [out]`` fp32 or None). Rows whose ``index`` is outside ``[0, S)`` are left as
    they are."""
    torch.ops.frugallm.lora_bgmv(y, x, a_pool, b_tiles, index, ranks, parts, dora_scale, bias)
