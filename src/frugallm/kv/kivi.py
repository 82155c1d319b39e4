"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization (Liu et al., 2024).

Keys are quantized per channel over groups of ``group`` consecutive tokens (outlier channels keep
their own range), values per token in groups of ``group`` channels. The most recent ``residual``
tokens stay in full precision: tokens are quantized ``group`` at a time once ``residual + group``
are waiting, so at least the last ``residual`` tokens are always exact.

Storage is packed uint8 codes plus fp16 scale/zero (:class:`~frugallm.kv.quantize.QuantizedSequence`);
attention runs over the dequantized copy. When an evictor later drops single tokens from the
quantized region, each key keeps a pointer to its group's (scale, zero) and a group's entry is freed
once no head uses it any more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, Quantizer
from frugallm.kv.quantize import QuantizedSequence, channel_group
from frugallm.kv.stores import Store, StoreContext


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
        residual = self.residual if ctx.max_residual is None else min(self.residual, ctx.max_residual)
        return KIVIStore(ctx, self.bits, self.group, residual)


class KIVIStore(Store):
    """Keys quantized per channel, values per token, both with the same full-precision window."""

    def __init__(self, ctx: StoreContext, bits: int, group: int, residual: int) -> None:
        self.ctx = ctx
        lead, kw = (ctx.batch, ctx.kv_heads), dict(bits=bits, residual=residual, flush=group, dtype=ctx.dtype,
                                                  device=ctx.device)
        self.k = QuantizedSequence(lead, ctx.key_dim, axis="channel", group=group, **kw)
        self.v = QuantizedSequence(lead, ctx.head_dim, axis="token", group=channel_group(ctx.head_dim, group), **kw)

    @property
    def num_quantized(self) -> int:
        return self.k.num_quantized

    @property
    def num_slots(self) -> int:
        return self.k.num_slots

    @property
    def protected(self) -> int:
        return self.k.res.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None, positions: torch.Tensor) -> None:
        self.k.append(k)
        self.v.append(v)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.materialize(), self.v.materialize()

    def gather(self, idx: torch.Tensor) -> None:
        idx = idx.expand(self.ctx.batch, self.ctx.kv_heads, idx.shape[2])
        self.k.gather(idx)
        self.v.gather(idx)

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()
