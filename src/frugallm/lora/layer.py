"""``LoraLinear``: a model linear (float, quantized or GGUF as stored) with adapter slots beside it.

The base module runs untouched (an adapter is never merged into it); the adapters' low-rank products of the rows
that use one are added to its output (:mod:`frugallm.lora.punica`: on CPU one native call per module, in place, so
an adapted module costs one op beside its base; the torch path elsewhere). A fused linear (q/k/v, gate/up) has
one pool per row range ("part"), so an adapter may adapt any subset of the projections.

DoRA (``y = m / ||W + s B A||_row * (W x + s B A x) + bias``) is ``g * (base(x) - bias) + bias + g * s B A x`` with
``g = m / ||W + s B A||`` per output row, computed once when the adapter is placed (from the dequantized base
weight, as PEFT does); ``g`` is folded into the slot's ``B`` and kept per slot for the base term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frugallm.lora import punica
from frugallm.lora.adapter import LoraWeights
from frugallm.lora.punica import LoraBatch, bgmv
from frugallm.model.decode_plan import linear_fn


class LoraContext:
    """The batch the next forward runs (``None``: no row uses an adapter); shared by a model's LoRA linears."""

    batch: LoraBatch | None = None


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base module's weight ``[out, in]`` in fp32 (dequantized for quantized modules)."""
    dequantize = getattr(base, "dequantize", None)
    return (dequantize(torch.float32) if dequantize is not None else base.weight).detach().float()


class LoraLinear(nn.Module):
    """``base`` plus ``slots`` adapter slots of rank ``rank`` (zero-padded) per part of ``parts`` output rows.

    Pools (see :mod:`frugallm.lora.punica`): ``a_pool [P, slots * rank, in]``; ``b_pool`` in the kernel's tiles
    ``[slots, T, rank, 64]`` where ``native`` (CPU, fp32/bf16), else ``[slots * rank, out]`` (k-major);
    ``ranks [slots, P]`` int32; ``dora_scale [slots + 1, out]`` fp32 once a DoRA adapter is placed."""

    def __init__(self, base: nn.Module, in_features: int, parts: list[int], slots: int, rank: int,
                 dtype: torch.dtype, ctx: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, sum(parts)
        self.parts, self.slots, self.rank, self.ctx = parts, slots, rank, ctx
        self.offsets = [sum(parts[:j]) for j in range(len(parts))]
        device = next(base.buffers(), next(base.parameters(), None))
        dev = device.device if device is not None else torch.device("cpu")
        # Plain attributes, not buffers: the model's weights (and their byte counts) stay the base model's.
        self.a_pool = torch.zeros(len(parts), slots * rank, in_features, dtype=dtype, device=dev)
        self.native = punica.native_pools(dev, dtype)
        self.tile0 = punica.tiles(parts)
        shape = (slots, self.tile0[-1], rank, punica.TILE) if self.native else (slots * rank, self.out_features)
        self.b_pool = torch.zeros(shape, dtype=dtype, device=dev)
        self.ranks = torch.zeros(slots, len(parts), dtype=torch.int32, device=dev)
        self.users = [0] * len(parts)  # slots holding factors for each part (parts nobody adapts are skipped)
        self.slot_parts: dict[int, list[int]] = {}
        self.dora_scale: torch.Tensor | None = None  # [slots + 1, out]; row `slots` is all ones (rows with none)
        bias = getattr(base, "bias", None)
        self.bias = bias if isinstance(bias, torch.Tensor) else None
        self.bias_f32 = None if self.bias is None else self.bias.detach().float().contiguous()  # DoRA's, native

    # -- slots ---------------------------------------------------------------------------------------------
    def place(self, slot: int, factors: dict[int, LoraWeights]) -> None:
        """Put an adapter's factors (per part) into ``slot`` (which must be clear)."""
        assert slot not in self.slot_parts
        dora = any(w.magnitude is not None for w in factors.values())
        if dora:
            if self.dora_scale is None:
                self.dora_scale = torch.ones(self.slots + 1, self.out_features, dtype=torch.float32,
                                             device=self.a_pool.device)
            weight = base_weight(self.base)
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        for j, w in sorted(factors.items()):
            dev = self.a_pool.device  # adapters are read on the CPU; DoRA's norm runs beside the base weight
            r, a, b = w.a.shape[0], w.a.to(dev), w.b.to(dev)
            cols = slice(self.offsets[j], self.offsets[j] + self.parts[j])
            if w.magnitude is not None:
                g = w.magnitude.to(dev) / torch.linalg.norm(weight[cols].to(dev) + b @ a, dim=1)
                assert self.dora_scale is not None
                self.dora_scale[slot, cols] = g
                b = b * g[:, None]
            self.a_pool[j, rows.start : rows.start + r] = a
            if self.native:
                self.b_pool[slot, self.tile0[j] : self.tile0[j + 1]] = punica.tile_b(b, self.rank)
            else:
                self.b_pool[rows.start : rows.start + r, cols] = b.T
            self.ranks[slot, j] = r
            self.users[j] += 1
        self.slot_parts[slot] = sorted(factors)

    def clear(self, slot: int) -> None:
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        for j in self.slot_parts.pop(slot, []):
            self.a_pool[j, rows] = 0
            if self.native:
                self.b_pool[slot, self.tile0[j] : self.tile0[j + 1]] = 0
            else:
                self.b_pool[rows, self.offsets[j] : self.offsets[j] + self.parts[j]] = 0
            self.users[j] -= 1
        self.ranks[slot] = 0
        if self.dora_scale is not None:
            self.dora_scale[slot] = 1

    # -- forward -------------------------------------------------------------------------------------------
    def add_adapters(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y = base(x)`` plus each row's adapter (``x [..., in]``, ``y [..., out]``; ``y`` is updated in place
        where it can be)."""
        batch = self.ctx.batch
        if batch is None or not self.slot_parts:
            return y
        x2 = x.reshape(-1, self.in_features)
        y2 = y.reshape(-1, self.out_features)
        dora = self.dora_scale if batch.dora else None
        if self.native:
            if x2.dtype not in punica.NATIVE_DTYPES or x2.stride(-1) != 1:
                x2 = x2.to(self.a_pool.dtype).contiguous()
            if y2.dtype not in punica.NATIVE_DTYPES or y2.stride(-1) != 1:  # fp16: added in fp32, rounded once
                yf = y2.float()
                punica.bgmv_native(yf, x2, self.a_pool, self.b_pool, batch.index, self.ranks, self.parts, dora,
                                   self.bias_f32)
                return yf.to(y.dtype).view(y.shape)
            punica.bgmv_native(y2, x2, self.a_pool, self.b_pool, batch.index, self.ranks, self.parts, dora,
                               self.bias_f32)
            return y if y.dim() == 2 else y2.view(y.shape)  # y2 is y's rows (a view) or their copy
        pool_dtype = self.a_pool.dtype
        xc = x2 if x2.dtype == pool_dtype else x2.to(pool_dtype)
        if dora is not None:
            g = dora[batch.index].to(y2.dtype)
            y2 = y2 * g if self.bias is None else (y2 - self.bias.to(y2.dtype)) * g + self.bias.to(y2.dtype)
        for j, n in enumerate(self.parts):
            if self.users[j]:
                cols = slice(self.offsets[j], self.offsets[j] + n)
                d = bgmv(xc, self.a_pool[j], self.b_pool[:, cols], batch, self.rank)
                y2[:, cols] += d if d.dtype == y2.dtype else d.to(y2.dtype)
        return y2.view(y.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_adapters(x, self.base(x))

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The base module's decode callable (see ``DecodePlan``) plus the adapters of the bound batch: on the
        kernel, one in-place call on the base output (decode rows are 2-D with unit column stride)."""
        base_fn, add, ctx = linear_fn(self.base, dtype, device), self.add_adapters, self.ctx
        if not (self.native and dtype in punica.NATIVE_DTYPES):
            return lambda x: add(x, base_fn(x))
        op = torch.ops.frugallm.lora_bgmv.default
        a, b, ranks, parts, slot_parts, bias = self.a_pool, self.b_pool, self.ranks, self.parts, self.slot_parts, \
            self.bias_f32

        def run(x: torch.Tensor) -> torch.Tensor:
            y = base_fn(x)
            batch = ctx.batch
            if batch is None or not slot_parts:
                return y
            if y.dtype not in punica.NATIVE_DTYPES or y.stride(-1) != 1 or x.stride(-1) != 1:
                return add(x, y)
            op(y, x, a, b, batch.index, ranks, parts, self.dora_scale if batch.dora else None, bias)
            return y

        return run

    def extra_repr(self) -> str:
        return f"parts={self.parts}, slots={self.slots}, rank={self.rank}"
