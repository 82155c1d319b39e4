"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization (Liu et al., 2024).

Keys are quantized per channel over groups of ``group`` consecutive tokens (outlier channels keep
their own range), values per token in groups of ``group`` channels. The most recent ``residual``
tokens stay in full precision: tokens are quantized ``group`` at a time once ``residual + group``
are waiting, so at least the last ``residual`` tokens are always exact.

Storage is packed uint8 codes plus fp16 scale/zero; attention runs over the dequantized copy. When
an evictor later drops single tokens from the quantized region, each key keeps a pointer to its
group's (scale, zero) and a group's entry is freed once no head uses it any more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, Quantizer
from frugallm.kv.quantize import (
    channel_group,
    dequantize,
    dequantize_groups,
    nbytes,
    pack,
    quantize,
    quantize_groups,
    unpack,
)
from frugallm.kv.stores import Store, StoreContext, gather_slots


@KV_POLICIES.register("kivi")
@dataclass(frozen=True)
class KIVI(Quantizer):
    """``kivi:bits=2,group=32,residual=128`` (bits in {2, 4})."""

    name: ClassVar[str] = "kivi"
    bits: int = 2
    group: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            self._fail(f"bits must be 2 or 4, got {self.bits}")
        self._check_int("group", self.group, 1)
        self._check_int("residual", self.residual, 0)

    def make_store(self, ctx: StoreContext) -> Store:
        return KIVIStore(ctx, self.bits, self.group, self.residual)


class KIVIStore(Store):
    """Quantized region (packed codes) followed by a full-precision residual window."""

    def __init__(self, ctx: StoreContext, bits: int, group: int, residual: int) -> None:
        self.ctx, self.bits, self.group, self.residual = ctx, bits, group, residual
        self.vgroup = channel_group(ctx.head_dim, group)
        b, h, dev = ctx.batch, ctx.kv_heads, ctx.device
        dk, dv = ctx.key_dim, ctx.head_dim
        u8, f16 = torch.uint8, torch.float16
        self.kq = torch.empty(b, h, 0, pack(torch.zeros(dk, dtype=u8), bits).shape[0], dtype=u8, device=dev)
        self.k_scale = torch.empty(b, h, 0, dk, dtype=f16, device=dev)
        self.k_zero = torch.empty_like(self.k_scale)
        self.k_gid: torch.Tensor | None = None  # [b, h, nq] int32 once single tokens were evicted
        self.vq = torch.empty(b, h, 0, pack(torch.zeros(dv, dtype=u8), bits).shape[0], dtype=u8, device=dev)
        self.v_scale = torch.empty(b, h, 0, dv // self.vgroup, dtype=f16, device=dev)
        self.v_zero = torch.empty_like(self.v_scale)
        self.rk = torch.empty(b, h, 0, dk, dtype=ctx.dtype, device=dev)
        self.rv = torch.empty(b, h, 0, dv, dtype=ctx.dtype, device=dev)

    @property
    def num_quantized(self) -> int:
        return self.kq.shape[2]

    @property
    def num_slots(self) -> int:
        return self.num_quantized + self.rk.shape[2]

    @property
    def protected(self) -> int:
        return self.rk.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None, positions: torch.Tensor) -> None:
        self.rk = torch.cat([self.rk, k.to(self.ctx.dtype)], dim=2)
        self.rv = torch.cat([self.rv, v.to(self.ctx.dtype)], dim=2)
        waiting = self.rk.shape[2] - self.residual
        if waiting >= self.group:
            self._flush(waiting // self.group * self.group)

    def _flush(self, m: int) -> None:
        """Quantize the oldest ``m`` residual tokens (a multiple of ``group``)."""
        b, h, _, dk = self.rk.shape
        ng, g = m // self.group, self.group
        keys = self.rk[:, :, :m].reshape(b, h, ng, g, dk)
        codes, scale, zero = quantize(keys, self.bits, dim=3)  # per channel over g tokens
        self.kq = torch.cat([self.kq, pack(codes.reshape(b, h, m, dk), self.bits)], dim=2)
        if self.k_gid is not None:
            first = self.k_scale.shape[2]
            gid = torch.arange(first, first + ng, device=self.rk.device, dtype=torch.int32).repeat_interleave(g)
            self.k_gid = torch.cat([self.k_gid, gid.expand(b, h, m)], dim=2)
        self.k_scale = torch.cat([self.k_scale, scale.squeeze(3)], dim=2)
        self.k_zero = torch.cat([self.k_zero, zero.squeeze(3)], dim=2)
        vcodes, vscale, vzero = quantize_groups(self.rv[:, :, :m], self.bits, self.vgroup)  # per token
        self.vq = torch.cat([self.vq, vcodes], dim=2)
        self.v_scale = torch.cat([self.v_scale, vscale], dim=2)
        self.v_zero = torch.cat([self.v_zero, vzero], dim=2)
        self.rk, self.rv = self.rk[:, :, m:].clone(), self.rv[:, :, m:].clone()

    def _key_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slot key (scale, zero) ``[b, h, nq, dk]``."""
        if self.k_gid is None:
            g = self.group
            return self.k_scale.repeat_interleave(g, dim=2), self.k_zero.repeat_interleave(g, dim=2)
        idx = self.k_gid.long()[..., None].expand(-1, -1, -1, self.k_scale.shape[3])
        return torch.gather(self.k_scale, 2, idx), torch.gather(self.k_zero, 2, idx)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized quantized region only: ``[b, h, nq, dk]``, ``[b, h, nq, dv]``."""
        dt = self.ctx.dtype
        scale, zero = self._key_params()
        keys = dequantize(unpack(self.kq, self.bits, self.ctx.key_dim), scale, zero, dt)
        values = dequantize_groups(self.vq, self.v_scale, self.v_zero, self.bits, self.ctx.head_dim, dt)
        return keys, values

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_quantized == 0:
            return self.rk, self.rv
        keys, values = self.dequantized()
        return torch.cat([keys, self.rk], dim=2), torch.cat([values, self.rv], dim=2)

    def gather(self, idx: torch.Tensor) -> None:
        nq, r = self.num_quantized, self.rk.shape[2]
        keep_q = idx.shape[2] - r
        assert keep_q >= 0 and bool((idx[..., keep_q:] >= nq).all()), "the residual window must be kept"
        b, h = self.kq.shape[:2]
        qidx = idx[..., :keep_q].expand(b, h, keep_q)
        if self.k_gid is None:
            gid = torch.arange(nq, device=idx.device, dtype=torch.int32) // self.group
            self.k_gid = gid.expand(b, h, nq)
        self.kq, self.vq = gather_slots(self.kq, qidx), gather_slots(self.vq, qidx)
        self.v_scale, self.v_zero = gather_slots(self.v_scale, qidx), gather_slots(self.v_zero, qidx)
        self.k_gid = torch.gather(self.k_gid, 2, qidx)
        # Free the (scale, zero) entries of groups no head points to any more.
        used = torch.zeros(self.k_scale.shape[2], dtype=torch.bool, device=idx.device)
        used[self.k_gid.long().flatten()] = True
        if not bool(used.all()):
            remap = (used.cumsum(0) - 1).to(torch.int32)
            self.k_gid = remap[self.k_gid.long()]
            self.k_scale, self.k_zero = self.k_scale[:, :, used], self.k_zero[:, :, used]

    def nbytes(self) -> int:
        return nbytes(self.kq, self.k_scale, self.k_zero, self.k_gid, self.vq, self.v_scale, self.v_zero,
                      self.rk, self.rv)
