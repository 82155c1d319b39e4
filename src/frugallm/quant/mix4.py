"""BitMoD-style mixture of 4-bit data types: every weight group picks the grid that reconstructs it best.

Four 16-level grids, selected per group by a 2-bit selector (``w = grid[sel][code] * scale + offset``):

0. ``int4_asym``: levels 0..15, ``scale = (max - min) / 15``, ``offset = min``.
1. ``fp4_er``: FP4 e2m1 (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6) with the redundant -0 code reused for an
   extra value 5 ("extra resolution"), ``scale = a / 6`` where ``a`` is the group's largest-magnitude
   value *with its sign*, so the extra level lands on the heavier side of the group.
2. ``fp4_ea``: e2m1 with -0 reused for 8 ("extra asymmetry"), ``scale = a / 8``.
3. ``fp4_shift``: e2m1 shifted to the group's midrange, ``scale = (max - min) / 12``, ``offset = (max + min) / 2``.

Storage per group: scale and offset (16-bit) and the 2-bit selector; codes are 4-bit packed. There is
no torch kernel for a per-group look-up table: up to 16 rows (decode) run frugallm's native kernel on the
stored format (``csrc/mix4_linear.cpp``: a group's grid in a register, 16 look-ups per ``vpermps``; one
batch-1 pass over SmolLM2's matrices 4.4 ms instead of ~400); more rows dequantize then call ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.quant import kernels
from frugallm.quant.groups import check_groups, param_dtype
from frugallm.quant.layer import bias_of, flatten_input, tensor_bytes
from frugallm.quant.packing import pack, unpack
from frugallm.quant.spec import QuantSpec

_E2M1 = [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
GRIDS = torch.tensor(
    [
        [float(i) for i in range(16)],
        sorted([*_E2M1, 5.0]),
        sorted([*_E2M1, 8.0]),
        sorted([*_E2M1, 0.0]),  # the spare code stays a second zero
    ]
)
TYPE_NAMES = ("int4_asym", "fp4_er", "fp4_ea", "fp4_shift")


@dataclass
class Mix4State:
    codes: torch.Tensor  # [N, K] uint8 in [0, 16)
    selector: torch.Tensor  # [N, K/g] uint8 in [0, 4)
    scales: torch.Tensor  # [N, K/g] fp32 (already rounded to storage precision)
    offsets: torch.Tensor  # [N, K/g]
    group_size: int
    bias: torch.Tensor | None = None


def _type_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and offsets ``[4, N, G]`` of every type for groups ``w [N, G, g]``."""
    lo, hi = w.amin(-1), w.amax(-1)
    signed_max = torch.where(hi.abs() >= lo.abs(), hi, lo)
    zero = torch.zeros_like(lo)
    scales = torch.stack([(hi - lo) / 15, signed_max / 6, signed_max / 8, (hi - lo) / 12])
    offsets = torch.stack([lo, zero, zero, (hi + lo) / 2])
    scales = torch.where(scales != 0, scales, torch.ones_like(scales))
    dtype = param_dtype(scales, offsets)
    return scales.to(dtype).float(), offsets.to(dtype).float()


def mix4_quantize(weight: torch.Tensor, group_size: int) -> Mix4State:
    """Per-group best-of-four 4-bit quantization of ``weight [N, K]`` by squared reconstruction error."""
    n, k = weight.shape
    check_groups(k, group_size)
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    scales, offsets = _type_params(w)
    grids = GRIDS.to(w.device)
    best_err = best_codes = best_sel = None
    for t in range(len(GRIDS)):
        u = (w - offsets[t, ..., None]) / scales[t, ..., None]
        mids = (grids[t, 1:] + grids[t, :-1]) / 2
        codes = torch.bucketize(u.contiguous(), mids)  # nearest level of the sorted grid
        err = ((grids[t][codes] * scales[t, ..., None] + offsets[t, ..., None] - w) ** 2).sum(-1)
        if best_err is None:
            best_err, best_codes = err, codes
            best_sel = torch.zeros_like(err, dtype=torch.long)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_codes = torch.where(better[..., None], codes, best_codes)
            best_sel = torch.where(better, t, best_sel)
    idx = best_sel[None]
    return Mix4State(
        codes=best_codes.reshape(n, k).to(torch.uint8),
        selector=best_sel.to(torch.uint8),
        scales=scales.gather(0, idx)[0],
        offsets=offsets.gather(0, idx)[0],
        group_size=group_size,
    )


class Mix4Linear(nn.Module):
    """Linear with BitMoD-style per-group 4-bit data types (module docstring); dequantize-then-matmul."""

    def __init__(self, state: Mix4State) -> None:
        super().__init__()
        self.out_features, self.in_features = state.codes.shape
        self.group_size = state.group_size
        self.register_buffer("qweight", pack(state.codes, 4))
        self.register_buffer("selector", pack(state.selector, 2))
        dtype = param_dtype(state.scales, state.offsets)
        self.register_buffer("qscale", torch.stack([state.scales, state.offsets], -1).to(dtype))
        self.register_buffer("grids", GRIDS.to(state.codes.device), persistent=False)
        self.register_buffer("bias", state.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> Mix4Linear:
        state = mix4_quantize(linear.weight, spec.group_size or 64)
        state.bias = bias_of(linear)
        return cls(state)

    def type_histogram(self) -> dict[str, int]:
        """How many groups chose each data type (for reports)."""
        sel = unpack(self.selector, 2, self.in_features // self.group_size)
        counts = torch.bincount(sel.reshape(-1).long(), minlength=len(TYPE_NAMES))
        return dict(zip(TYPE_NAMES, counts.tolist(), strict=True))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        if dtype == torch.bfloat16 and self._native_ok(self.qweight.device, dtype):
            # Prefill's dequantize-then-GEMM: one native pass instead of a gather per weight.
            return torch.ops.frugallm.mix4_dequantize(self.qweight, self.selector, self.qscale, self.grids, g, k)
        codes = unpack(self.qweight, 4, k).reshape(n, k // g, g).long()
        sel = unpack(self.selector, 2, k // g).long()
        levels = self.grids.float().reshape(-1)[sel[..., None] * 16 + codes]
        qs = self.qscale.float()  # one rounding to dtype at the end (see linear.dequant_groups)
        return (levels * qs[..., :1] + qs[..., 1:]).reshape(n, k).to(dtype)

    def _native_ok(self, device: torch.device, dtype: torch.dtype) -> bool:
        k, g = self.in_features, self.group_size
        shape_ok = g % 16 == 0 and k % 32 == 0 and (k // 2) % g == 0 and k // g <= 512
        return shape_ok and kernels.native_kernel("mix4_linear", device, dtype)

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` bf16, M <= NATIVE_QUANT_MAX_ROWS -> ``[M, N]`` bf16 on the stored codes (no bias)."""
        return torch.ops.frugallm.mix4_linear(x, self.qweight, self.selector, self.qscale, self.grids,
                                              self.group_size, None)

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """``self(x)`` for 2-D ``x`` in ``dtype`` (see ``DecodePlan``): the native kernel directly where it serves."""
        if self.bias is not None or not self._native_ok(device, dtype):
            return self.forward
        args = (self.qweight, self.selector, self.qscale, self.grids, self.group_size, None)
        return kernels.few_rows_kernel(torch.ops.frugallm.mix4_linear, args, self.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = flatten_input(x, self.in_features)
        cd = kernels.compute_dtype(x.device, x.dtype)
        if x2.shape[0] <= kernels.NATIVE_QUANT_MAX_ROWS and self._native_ok(x.device, cd):
            y = self._native(x2.to(cd).contiguous()).to(x.dtype)
        else:
            y = F.linear(x2.to(cd), self.dequantize(cd)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return tensor_bytes(self.qweight, self.selector, self.qscale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
