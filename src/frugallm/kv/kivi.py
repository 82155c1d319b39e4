"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization (Liu et al., 2024), with three additions.

As in the paper, keys are quantized per channel over groups of ``group`` consecutive tokens (outlier
channels keep their own range) and values per token; the most recent ``residual`` tokens stay in full
precision and tokens are quantized as they leave that window. Each addition is an option:

* ``sinks``: the first tokens stay exact (IntactKV / StreamingLLM attention sinks). They take a large
  share of attention in most layers and their outlier keys would widen their group's range.
* ``clip``: each group's range is shrunk towards its midpoint when that lowers the squared error
  (searched over ``1, 0.95, ..., clip``), the usual weight-quantization clipping applied to K and V.
* ``rotate``: values are rotated by a Hadamard matrix before per-token quantization (QuaRot), which
  spreads outlier channels over the whole group; dequantization rotates back. Keys are not rotated:
  their per-channel ranges are what keeps outlier channels cheap.

Metadata is what decides the bytes at 2 bits: with ``scales=fp8`` the per-channel key scales and the
per-token value scales and zeros are stored in fp8 e4m3 (codes are computed against the rounded values,
so nothing is lost but grid resolution), key zeros stay fp16 (they carry bias-sized offsets such as
Qwen's K bias). With the defaults a key costs 2 bits + 3 bytes/(64 tokens) per channel and a value
2 bits per channel + 2 bytes per token: 0.145x fp16 for a head of 64, so the whole cache (window and
sinks included) is <= 0.2x fp16 from 2k tokens on.

Storage is packed uint8 codes plus scale/zero (:class:`~frugallm.kv.quantize.QuantizedSequence`);
attention runs over the dequantized copy. When an evictor later drops single tokens from the
quantized region, each key keeps a pointer to its group's (scale, zero) and a group's entry is freed
once no head uses it any more; sinks and the window are never evicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, Quantizer
from frugallm.kv.quantize import FP8, QuantizedSequence, channel_group
from frugallm.kv.stores import Store, StoreContext


@KV_POLICIES.register("kivi")
@dataclass(frozen=True)
class KIVI(Quantizer):
    """``kivi:bits=2,group=64,vgroup=none,residual=128,sinks=4,clip=0.6,rotate=1,scales=fp8``.

    ``bits`` in {2, 4}; ``group`` tokens per key quantization group; ``vgroup`` channels per value
    group (none: the whole head); ``clip=1`` turns the range search off; ``rotate=0`` stores values
    unrotated; ``scales`` fp8 | fp16.
    """

    name: ClassVar[str] = "kivi"
    bits: int = 2
    group: int = 64
    vgroup: int | None = None
    residual: int = 128
    sinks: int = 4
    clip: float = 0.6
    rotate: int = 1
    scales: str = "fp8"

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            self._fail(f"bits must be 2 or 4, got {self.bits}")
        self._check_int("group", self.group, 1)
        self._check_int("vgroup", self.vgroup, 1, allow_none=True)
        self._check_int("residual", self.residual, 0)
        self._check_int("sinks", self.sinks, 0)
        if not 0.05 <= float(self.clip) <= 1.0:
            self._fail(f"clip must be in [0.05, 1] (smallest range shrink factor tried), got {self.clip}")
        if self.rotate not in (0, 1):
            self._fail(f"rotate must be 0 or 1, got {self.rotate}")
        if self.scales not in ("fp8", "fp16"):
            self._fail(f"scales must be fp8 or fp16, got {self.scales!r}")

    def make_store(self, ctx: StoreContext) -> Store:
        residual = self.residual if ctx.max_residual is None else min(self.residual, ctx.max_residual)
        return KIVIStore(ctx, self, residual)


class KIVIStore(Store):
    """Keys quantized per channel, values per token, both with the same exact sinks and window."""

    def __init__(self, ctx: StoreContext, p: KIVI, residual: int) -> None:
        self.ctx = ctx
        fp8 = FP8 if p.scales == "fp8" else torch.float16
        kw = dict(bits=p.bits, residual=residual, flush=1, sinks=p.sinks, clip=p.clip, dtype=ctx.dtype,
                  device=ctx.device)
        lead = (ctx.batch, ctx.kv_heads)
        self.k = QuantizedSequence(lead, ctx.key_dim, axis="channel", group=p.group, scale_dtype=fp8, **kw)
        vgroup = channel_group(ctx.head_dim, p.vgroup or ctx.head_dim)
        self.v = QuantizedSequence(lead, ctx.head_dim, axis="token", group=vgroup, scale_dtype=fp8, zero_dtype=fp8,
                                   rotate=bool(p.rotate), **kw)

    @property
    def num_quantized(self) -> int:
        return self.k.num_quantized

    @property
    def num_slots(self) -> int:
        return self.k.num_slots

    @property
    def protected(self) -> int:
        # Keys may hold a few more exact tokens than values while a key group fills (residual < group - 1).
        return max(self.k.res.shape[2], self.v.res.shape[2])

    @property
    def pinned(self) -> int:
        return self.k.sink.shape[2]

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
