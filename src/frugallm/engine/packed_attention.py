"""Decode attention over KIVI chunks packed in the paged pool (``kv.kivi.PagedKIVI``, packed by ``packed_kv.py``).

A decode row with packed chunks attends over ``[its chunks | its bf16 slots (sinks, exact window)]``. Two paths:

* **Fused** (half-precision pools on CPU, where both native kernels build): the batch keeps the fused paged kernel
  (``csrc/paged_attention.cpp``) over every row's bf16 slots, which also returns each query head's log-sum-exp;
  the packed rows' chunks are attended by ``csrc/kivi_attention.cpp`` straight from their codes (the scales are
  folded into the query and the probabilities, nothing is dequantized), and the two softmaxes are merged by
  their log-sum-exps. Rows without chunks in the same batch are untouched.
* **Torch** (fp32 pools, or no kernel): each packed row's chunks are dequantized and put before its bf16 slots,
  right-aligned before slot ``max_len``, and the whole batch runs the gather + SDPA path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from frugallm import native
from frugallm.kv.kivi import PagedKIVI


def kernel_available() -> bool:
    """Whether packed rows can keep the fused decode path (both kernels built on this machine)."""
    return native.load("kivi_attention") and native.load("paged_attention")


def pool_bytes(pool: torch.Tensor) -> torch.Tensor:
    """A pool ``[blocks, block_size, kv_heads, D]`` seen as uint8 ``[blocks, block_bytes]``."""
    return pool.view(torch.uint8).view(pool.shape[0], -1)


class PackedRows:
    """The packed rows of one decode pass: ``{row: (codec, the chunks' blocks, in order)}``."""

    def __init__(self, packed: Mapping[int, tuple[PagedKIVI, list[int]]], device: torch.device) -> None:
        self.rows = {r: (codec, torch.tensor(blocks, dtype=torch.long, device=device))
                     for r, (codec, blocks) in packed.items()}
        self.lens = {r: len(b) // c.blocks_per_chunk * c.chunk_tokens for r, (c, b) in self.rows.items()}
        self.max_len = max(self.lens.values(), default=0)
        # Per codec (one per distinct KIVI spec): its rows, their blocks concatenated, chunk offsets per row.
        by: dict[PagedKIVI, list[int]] = {}
        for r, (c, _) in self.rows.items():
            by.setdefault(c, []).append(r)
        self.groups = []
        for c, rows in by.items():
            counts = [len(self.rows[r][1]) // c.blocks_per_chunk for r in rows]
            offsets = torch.tensor([0, *counts], dtype=torch.long).cumsum(0)
            blocks = torch.cat([self.rows[r][1] for r in rows])
            self.groups.append((c, torch.tensor(rows, dtype=torch.long, device=device), blocks, offsets))

    def __bool__(self) -> bool:
        return bool(self.rows)

    def row_len(self, row: int) -> int:
        return self.lens.get(row, 0)

    @staticmethod
    def read(k_pool: torch.Tensor, v_pool: torch.Tensor, codec: PagedKIVI,
             blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunks stored in ``blocks`` (``blocks_per_chunk`` per chunk, in order) of one layer's pools: uint8
        ``[chunks, key bytes]``, ``[chunks, value bytes]`` for :meth:`PagedKIVI.decode`."""
        n = len(blocks) // codec.blocks_per_chunk
        k = pool_bytes(k_pool).index_select(0, blocks).view(n, -1)[:, :sum(codec.k_sizes)]
        v = pool_bytes(v_pool).index_select(0, blocks).view(n, -1)[:, :sum(codec.v_sizes)]
        return k, v

    def prepend(self, k_pool: torch.Tensor, v_pool: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch path: ``keys, values [B, kv_heads, n, D]`` (bf16 slots) preceded by each packed row's dequantized
        chunks, right-aligned before slot ``max_len`` (zeros elsewhere: finite, masked)."""
        b, h, n, d = keys.shape
        p = self.max_len
        if b == 1:
            codec, blocks = self.rows[0]
            dk, dv = codec.decode(*self.read(k_pool, v_pool, codec, blocks))
            return torch.cat([dk[None].to(keys.dtype), keys], 2), torch.cat([dv[None].to(values.dtype), values], 2)
        out_k, out_v = keys.new_zeros(b, h, p + n, d), values.new_zeros(b, h, p + n, d)
        out_k[:, :, p:], out_v[:, :, p:] = keys, values
        for r, (codec, blocks) in self.rows.items():
            dk, dv = codec.decode(*self.read(k_pool, v_pool, codec, blocks))
            m = dk.shape[1]
            out_k[r, :, p - m:p], out_v[r, :, p - m:p] = dk, dv
        return out_k, out_v

    def merge(self, k_pool: torch.Tensor, v_pool: torch.Tensor, q: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, scale: float) -> None:
        """Fused path: ``out [B, heads, D]`` (fp32, attention over each row's bf16 slots, log-sum-exps ``lse [B,
        heads]``) becomes, in the packed rows, the attention over their chunks and those slots together.
        ``q [B, heads, D]`` fp32, contiguous."""
        bb = k_pool[0].numel() * k_pool.element_size()
        for codec, rows, blocks, offsets in self.groups:
            p = codec.p
            n = len(blocks) // codec.blocks_per_chunk
            kc = pool_bytes(k_pool).index_select(0, blocks).view(n, codec.blocks_per_chunk * bb)
            vc = pool_bytes(v_pool).index_select(0, blocks).view(n, codec.blocks_per_chunk * bb)
            o2, l2 = torch.ops.frugallm.kivi_decode_attention(
                q.index_select(0, rows), kc, vc, offsets, codec.kv_heads, codec.chunk_tokens, p.group, p.bits,
                p.scales == "fp8", scale)
            if codec.rotation is not None:  # values were quantized rotated; the weighted sum is linear
                o2 = o2 @ codec.rotation
            l1 = lse.index_select(0, rows)
            m = torch.maximum(l1, l2)
            w1, w2 = (l1 - m).exp_()[..., None], (l2 - m).exp_()[..., None]
            o1 = out.index_select(0, rows)
            out.index_copy_(0, rows, (o1 * w1 + o2 * w2) / (w1 + w2))
