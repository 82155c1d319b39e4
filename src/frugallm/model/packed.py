"""Pre-packed bf16 weights for CPU linears, in one of two kernels' layouts.

* ``native``: frugallm's kernel (``csrc/bf16_gemm.cpp``, ``torch.ops.frugallm.bf16_linear``), where the CPU
  has AVX512-BF16: the weight in VNNI pairs ``[ceil(N/16), K/2, 16, 2]``, streamed once per call with
  software prefetch. Measured on this 2-core CPU over all of SmolLM2's matrices: 16 rows 5.6 ms vs oneDNN's
  10.3, 1 row 3.8 vs 6.3, and ~900 GFLOP/s up to 256 rows. Above ``NATIVE_MAX_ROWS`` rows ``F.linear``
  (on the plain weight) is faster. Results are within bf16 rounding of ``F.linear`` (fp32 accumulation in
  another order), not bit-identical.
* ``onednn``: ``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise`` (the path inductor's
  freezing uses), bit-identical to ``F.linear``: where the native kernel does not build or the CPU lacks
  AVX512-BF16, or with ``FRUGALLM_NATIVE=0``. oneDNN's bf16 path needs AVX-512 BW/VL/DQ: below that (AVX2 CPUs)
  bf16 weights run through plain ``F.linear``, correct but slow, which is why ``dtype="auto"`` avoids bf16 there.

Either copy costs the weight's size again in memory (``Linear.packed_bytes``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from frugallm import cpu, native

NATIVE_MAX_ROWS = 256
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_ONEDNN_BATCH_HINT = 16  # oneDNN picks its blocking for this many rows


class Packed(NamedTuple):
    kind: str  # "native" | "onednn"
    weight: torch.Tensor  # the packed layout
    bias: torch.Tensor | None  # native: fp32 copy of the bias; onednn: the bias itself
    out_features: int


def backend(in_features: int) -> str | None:
    """The packing kernel for a bf16 CPU weight with ``in_features`` inputs, or None for plain ``F.linear``."""
    if in_features % 2 == 0 and native.usable("bf16_gemm"):
        return "native"
    return "onednn" if _ONEDNN and cpu.onednn_bf16() else None


def pack_vnni(w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` bf16 (K even) -> ``[ceil(N/16), K/2, 16, 2]``: 16 output rows' input pairs per 64 bytes."""
    n, k = w.shape
    blocks = -(-n // 16)
    if blocks * 16 != n:
        w = F.pad(w, (0, 0, 0, blocks * 16 - n))
    return w.reshape(blocks, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def pack(w: torch.Tensor, bias: torch.Tensor | None) -> Packed:
    kind = backend(w.shape[1])
    if kind == "native":
        b32 = None if bias is None else bias.detach().float().contiguous()
        return Packed(kind, pack_vnni(w.detach()), b32, w.shape[0])
    if kind == "onednn":
        return Packed(kind, torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ONEDNN_BATCH_HINT), bias, w.shape[0])
    raise RuntimeError("no packing kernel on this machine")


def linear(x: torch.Tensor, p: Packed, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for bf16 ``x [..., K]`` through the packed copy ``p``."""
    if p.kind == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, p.weight, p.bias, "none", [], "")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > NATIVE_MAX_ROWS:
        return F.linear(x, weight, bias)
    y = torch.ops.frugallm.bf16_linear(x2.contiguous(), p.weight, p.bias, p.out_features)
    return y.view(*x.shape[:-1], p.out_features)
