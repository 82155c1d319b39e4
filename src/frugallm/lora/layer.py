"""``LoraLinear``: a model linear (float, quantized or GGUF as stored) with adapter slots beside it.

The base module runs untouched (an adapter is never merged into it); the adapters' low-rank products of the rows
that use one are added to its output (:func:`frugallm.lora.punica.bgmv`). A fused linear (q/k/v, gate/up) has one
pool per row range ("part"), so an adapter may adapt any subset of the projections.

DoRA (``y = m / ||W + s B A||_row * (W x + s B A x) + bias``) is ``g * (base(x) - bias) + bias + g * s B A x`` with
``g = m / ||W + s B A||`` per output row, computed once when the adapter is placed (from the dequantized base
weight, as PEFT does); ``g`` is folded into the slot's ``B`` and kept per slot for the base term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

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
    """``base`` plus ``slots`` adapter slots of rank ``rank`` (zero-padded) per part of ``parts`` output rows."""

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
        self.a_pools = [torch.zeros(slots * rank, in_features, dtype=dtype, device=dev) for _ in parts]
        self.b_pools = [torch.zeros(n, slots * rank, dtype=dtype, device=dev) for n in parts]
        self.users = [0] * len(parts)  # slots holding factors for each part (parts nobody adapts are skipped)
        self.slot_parts: dict[int, list[int]] = {}
        self.dora_scale: torch.Tensor | None = None  # [slots + 1, out]; row `slots` is all ones (rows with none)
        bias = getattr(base, "bias", None)
        self.bias = bias if isinstance(bias, torch.Tensor) else None

    # -- slots ---------------------------------------------------------------------------------------------
    def place(self, slot: int, factors: dict[int, LoraWeights]) -> None:
        """Put an adapter's factors (per part) into ``slot`` (which must be clear)."""
        assert slot not in self.slot_parts
        dora = any(w.magnitude is not None for w in factors.values())
        if dora:
            if self.dora_scale is None:
                self.dora_scale = torch.ones(self.slots + 1, self.out_features, dtype=self.a_pools[0].dtype,
                                             device=self.a_pools[0].device)
            weight = base_weight(self.base)
        for j, w in sorted(factors.items()):
            r, b = w.a.shape[0], w.b
            if w.magnitude is not None:
                rows = slice(self.offsets[j], self.offsets[j] + self.parts[j])
                g = w.magnitude / torch.linalg.norm(weight[rows] + w.b @ w.a, dim=1)
                assert self.dora_scale is not None
                self.dora_scale[slot, rows] = g
                b = b * g[:, None]
            self.a_pools[j][slot * self.rank : slot * self.rank + r] = w.a
            self.b_pools[j][:, slot * self.rank : slot * self.rank + r] = b
            self.users[j] += 1
        self.slot_parts[slot] = sorted(factors)

    def clear(self, slot: int) -> None:
        for j in self.slot_parts.pop(slot, []):
            self.a_pools[j][slot * self.rank : (slot + 1) * self.rank] = 0
            self.b_pools[j][:, slot * self.rank : (slot + 1) * self.rank] = 0
            self.users[j] -= 1
        if self.dora_scale is not None:
            self.dora_scale[slot] = 1

    # -- forward -------------------------------------------------------------------------------------------
    def add_adapters(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y = base(x)`` plus each row's adapter (``x [..., in]``, ``y [..., out]``)."""
        batch = self.ctx.batch
        if batch is None or not self.slot_parts:
            return y
        x2 = x.reshape(-1, self.in_features)
        y2 = y.reshape(-1, self.out_features)
        pool_dtype = self.a_pools[0].dtype
        xc = x2 if x2.dtype == pool_dtype else x2.to(pool_dtype)
        if batch.dora and self.dora_scale is not None:
            g = self.dora_scale[batch.index].to(y2.dtype)
            y2 = y2 * g if self.bias is None else (y2 - self.bias.to(y2.dtype)) * g + self.bias.to(y2.dtype)
        for j, n in enumerate(self.parts):
            if self.users[j]:
                d = bgmv(xc, self.a_pools[j], self.b_pools[j], batch, self.rank)
                y2[:, self.offsets[j] : self.offsets[j] + n] += d if d.dtype == y2.dtype else d.to(y2.dtype)
        return y2.view(y.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_adapters(x, self.base(x))

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The base module's decode callable (see ``DecodePlan``) plus the adapters of the bound batch."""
        base_fn, add = linear_fn(self.base, dtype, device), self.add_adapters
        return lambda x: add(x, base_fn(x))

    def extra_repr(self) -> str:
        return f"parts={self.parts}, slots={self.slots}, rank={self.rank}"
