"""What every quantized linear shares: input/output shape and dtype handling, stored bytes, bias copies.

Every quantized replacement for ``nn.Linear`` computes ``forward(x [..., in]) -> [..., out]`` plus bias,
reports ``weight_bytes()``, the bytes it actually stores (codes, scales, offsets, permutations, bias), and is
built by ``from_linear(linear, spec)`` (round-to-nearest) or directly from a quantizer's state
(``GroupQuantLinear(state)``; GPTQ and the other methods in ``methods.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from frugallm.errors import FrugalError


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes stored by ``tensors`` (None entries, such as an absent bias, count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def flatten_input(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x [..., in_features]`` -> ``[M, in_features]`` (a view when possible); a wrong width is a user error."""
    if x.shape[-1] != in_features:
        raise FrugalError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    return x if x.dim() == 2 else x.reshape(-1, in_features)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Checked in Python: a no-op ``.to`` still costs a dispatch, and batch-1 decode is overhead bound.
    return t if t.dtype == dtype else t.to(dtype)


def finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``y [M, N]`` -> the input's dtype and leading shape, plus ``bias``."""
    y = as_dtype(y, x.dtype)
    if bias is not None:
        y = y + as_dtype(bias, x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)


def bias_of(linear: nn.Linear) -> torch.Tensor | None:
    """A detached copy of ``linear``'s bias ``[N]``: the quantized module must not share the float module's."""
    return None if linear.bias is None else linear.bias.detach().clone()
