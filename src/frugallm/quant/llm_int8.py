"""LLM.int8() (Dettmers et al. 2022): :class:`LLMInt8Linear`, int8 weights with int8 x int8 products.

Same stored weights as :class:`Int8Linear` (``int8.py``); only the forward differs: ``torch._int_mm``
(exact int32 accumulation) plus an outlier decomposition, or one native op for bf16 decode rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frugallm.quant import kernels
from frugallm.quant.int8 import Int8Linear, Int8State, quantize_int8_rows
from frugallm.quant.layer import bias_of, flatten_input
from frugallm.quant.spec import QuantSpec


class LLMInt8Linear(Int8Linear):
    """LLM.int8() (Dettmers et al. 2022): vector-wise int8 x int8 matmul plus an outlier decomposition.

    ``y = s_x s_w^T * (Xq_regular @ Wq^T)  +  X[:, O] @ (Wq[:, O] * s_w)^T`` where ``O`` are the input
    features whose activation magnitude exceeds ``threshold`` in this forward call (in any token row, as
    bitsandbytes). Regular columns are quantized per token row and multiplied exactly in int32
    (``torch._int_mm``); the outlier columns keep the activations in full precision.

    Row quantization: absmax (``Xq = round(127 X / absmax)``; the bitsandbytes kernel, the default) or,
    with ``zeropoint=True``, the paper's zeropoint variant (its Table 1: the most accurate one): each row
    is centred on ``c = (max + min) / 2`` of its regular values before rounding, so a skewed row uses all
    255 levels; ``c`` comes back through the int32 row sums of ``Wq`` over the regular columns.

    bf16 decode rows (absmax, no bias, up to ``NATIVE_QUANT_MAX_ROWS``) run the same arithmetic in one native op
    (``csrc/llm_int8_linear.cpp``: VNNI int8 products; within one bf16 step of this path).

    Memory choice (as in bitsandbytes): only the int8 weights are stored, for all columns; the outlier
    columns of W are dequantized on the fly. Keeping those columns in fp16, as in the paper, would need
    the full-precision weight since the outlier set is only known per input.

    The threshold is absolute, and 6.0 suits models whose normalized activations are O(1) (OPT, where the
    paper set it). SmolLM2-135M's are ~0.2-0.3 RMS and its systematic outlier features (e.g. channel 507
    of every ``qkv_proj`` input, largest on the first, attention-sink token) reach only 2-5: at 6.0 they
    stay in the int8 part (1.2% of input columns decomposed, nearly all late ``down_proj`` inputs), set
    the row scales, and the 8-bit rounding costs +1.8% perplexity (int8 weights alone: +0.4%); threshold
    2.0 decomposes 11% of the columns and costs +0.2% (2048 corpus tokens).
    """

    def __init__(self, state: Int8State, threshold: float = 6.0, zeropoint: bool = False) -> None:
        super().__init__(state)  # same stored weights as Int8Linear; only the forward differs
        self.threshold = float(threshold)
        self.zeropoint = bool(zeropoint)

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._rowsum: tuple[int, torch.Tensor] | None = None  # (qweight.data_ptr(), int32 [N])

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, spec: QuantSpec | None = None, zeropoint: bool = False
    ) -> LLMInt8Linear:
        q, s = quantize_int8_rows(linear.weight.detach())
        threshold = 6.0 if spec is None else spec.threshold
        return cls(Int8State(q, s, bias_of(linear)), threshold, zeropoint or (spec is not None and spec.zeropoint))

    def _weight_rowsum(self) -> torch.Tensor:
        """``sum_k Wq[n, k]`` as int32 ``[N]``: derived from ``qweight``, cached, never stored."""
        if self._rowsum is None or self._rowsum[0] != self.qweight.data_ptr():
            self._rowsum = (self.qweight.data_ptr(), self.qweight.sum(dim=1, dtype=torch.int32))
        return self._rowsum[1]

    def _quantize_rows(
        self, regular: torch.Tensor, outlier: torch.Tensor, any_outlier: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``regular [M, K]`` (outlier columns zeroed) -> ``(int8 [M, K], scale [M], centre [M] or None)``."""
        if not self.zeropoint:
            sx = regular.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            return torch.round(regular / sx[:, None]).clamp(-127, 127).to(torch.int8), sx, None
        # The range of the regular columns only: the zeroed outlier columns must not widen it.
        lo = (regular.masked_fill(outlier, float("inf")) if any_outlier else regular).amin(dim=1)
        hi = (regular.masked_fill(outlier, float("-inf")) if any_outlier else regular).amax(dim=1)
        lo, hi = lo.nan_to_num(posinf=0.0), hi.nan_to_num(neginf=0.0)  # when every column is an outlier
        centre = (hi + lo) / 2
        sx = ((hi - lo) / 254.0).clamp(min=1e-12)
        xq = torch.round((regular - centre[:, None]) / sx[:, None]).clamp(-127, 127)
        if any_outlier:
            xq = xq.masked_fill(outlier, 0.0)
        return xq.to(torch.int8), sx, centre

    def _native_ok(self, x_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether ``csrc/llm_int8_linear.cpp`` serves this call: absmax rows, no bias, bf16 CPU decode rows."""
        return (
            not self.zeropoint
            and self.bias is None
            and x_rows <= kernels.NATIVE_QUANT_MAX_ROWS
            and kernels.native_kernel("llm_int8_linear", device, dtype)
        )

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """``self(x)`` for 2-D ``x`` in ``dtype``: the native kernel directly where it serves (see ``forward``)."""
        if not self._native_ok(1, dtype, device):
            return self.forward
        args = (self.qweight, self.scales, self._weight_rowsum(), self.threshold)
        return kernels.few_rows_kernel(torch.ops.frugallm.llm_int8_linear, args, self.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = flatten_input(x, self.in_features)
        if x is x2 and x.is_contiguous() and self._native_ok(x.shape[0], x.dtype, x.device):
            # The same arithmetic as below, in one pass (int8 products on VNNI); bf16 decode rows only, so
            # fp32 inputs keep full-precision outlier columns.
            return torch.ops.frugallm.llm_int8_linear(x, self.qweight, self.scales, self._weight_rowsum(),
                                                      self.threshold)
        x2 = x2.float()
        outlier = (x2.abs() > self.threshold).any(dim=0)  # [K]
        cols = outlier.nonzero().squeeze(1)
        regular = x2.masked_fill(outlier, 0.0) if cols.numel() else x2
        xq, sx, centre = self._quantize_rows(regular, outlier, bool(cols.numel()))
        acc = kernels.int8_int8_mm(xq, self.qweight)  # [M, N] int32, exact
        y = acc.float() * sx[:, None] * self.scales[None, :]
        if centre is not None:  # zeropoint: + centre * sum over the regular columns of the weight row
            rowsum = self._weight_rowsum()
            if cols.numel():
                rowsum = rowsum - self.qweight[:, cols].sum(dim=1, dtype=torch.int32)
            y = y + centre[:, None] * (rowsum.float() * self.scales)[None, :]
        if cols.numel():
            w_out = self.qweight[:, cols].float() * self.scales[:, None]  # [N, |O|]
            y = y + x2[:, cols] @ w_out.t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        zp = ", zeropoint=True" if self.zeropoint else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}{zp}"
