"""Weight-only int8, per output channel and symmetric: :class:`Int8Linear`.

Kernel choices (CPU: EPYC with AVX512-BF16, 2 threads, torch 2.13; CUDA: H200, torch 2.11; us per matmul).
On CPU every path computes in bf16 (see ``kernels.py``) and casts the result back to the input dtype.
frugallm's native int8 kernel (``csrc/int8_linear.cpp``, AVX-512 CPUs) serves up to 16 rows: over
SmolLM2-135M's matrices 2.6 ms at 1 row vs 4.2 for ``torch._weight_int8pack_mm`` (12.5 vs 13.1 at 16).
Elsewhere, ``torch._weight_int8pack_mm`` for up to :data:`INT8_KERNEL_MAX_ROWS` token rows and
dequantize-then-matmul above: on CPU for 1536x576 the kernel takes 14 us at 1 row (bf16 ``F.linear``: 42,
fp32: 51) but 740 us at 128 rows, where dequantizing to bf16 and calling ``F.linear`` takes 370. On CUDA
neither beats fp16 ``F.linear`` (no fused int8 GEMV in torch); the kernel is used for single rows only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.model.casts import CastCache
from frugallm.quant import kernels
from frugallm.quant.layer import as_dtype, bias_of, finish, flatten_input, tensor_bytes
from frugallm.quant.spec import QuantSpec

# Above this many token rows dequantize + GEMM beats torch._weight_int8pack_mm. CPU: crossover between 32
# and 64 rows for the SmolLM2 shapes. CUDA (H200, torch 2.11): the kernel is only competitive for a
# single row (960x576: 58 vs 71 us) and collapses with rows (3072x576 at 64 rows: 168 vs 71 us).
INT8_KERNEL_MAX_ROWS = {"cpu": 32, "cuda": 1}


@dataclass
class Int8State:
    """Per-output-channel symmetric int8: ``w[n, k] = qweight[n, k] * scales[n]``."""

    qweight: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N] fp32
    bias: torch.Tensor | None


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``w [N, K]`` -> ``(int8 [N, K], fp32 scales [N])``."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """Weight-only int8 (per output channel, symmetric); see the module docstring for the kernel choice."""

    def __init__(self, state: Int8State) -> None:
        super().__init__()
        self.out_features, self.in_features = state.qweight.shape
        self.register_buffer("qweight", state.qweight.contiguous())
        self.register_buffer("scales", state.scales.float())
        self.register_buffer("bias", state.bias)
        self._init_runtime()

    def _init_runtime(self) -> None:
        """Derived, never-saved state; the storage loader calls this too (it bypasses ``__init__``)."""
        self._scales_cast = CastCache()  # the scales in the kernel's activation dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec | None = None) -> Int8Linear:
        q, s = quantize_int8_rows(linear.weight.detach())
        return cls(Int8State(q, s, bias_of(linear)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Full weight ``[N, K]`` in ``dtype``."""
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``[R] -> [R, K]`` fp32 (embedding lookup on shared storage)."""
        return self.qweight[rows].float() * self.scales[rows, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = flatten_input(x, self.in_features)
        cd = kernels.compute_dtype(x.device, x.dtype)
        xc = as_dtype(x2, cd)
        max_rows = INT8_KERNEL_MAX_ROWS.get(x.device.type, 0)
        if x2.shape[0] <= kernels.NATIVE_QUANT_MAX_ROWS and kernels.native_kernel("int8_linear", x.device, cd):
            y = torch.ops.frugallm.int8_linear(xc.contiguous(), self.qweight, self.scales, None)
        elif x2.shape[0] <= max_rows and kernels.int8pack_supported(x.device, self.in_features):
            y = kernels.int8_weight_mm(xc, self.qweight, self._scales_cast.get(self.scales, cd))
        else:
            y = F.linear(xc, self.dequantize(cd))
        return finish(y, x, self.bias, self.out_features)

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """``self(x)`` for 2-D ``x`` in ``dtype`` (see ``DecodePlan``): the native kernel directly where it
        serves, without ``forward``'s per-call checks (~10 us per call at batch 1)."""
        if self.bias is not None or not kernels.native_kernel("int8_linear", device, dtype):
            return self.forward
        return kernels.few_rows_kernel(torch.ops.frugallm.int8_linear, (self.qweight, self.scales, None), self.forward)

    def weight_bytes(self) -> int:
        return tensor_bytes(self.qweight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"
