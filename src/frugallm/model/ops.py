"""Functional building blocks shared by the module tree (``llama.py``) and the decode plan (``decode_plan.py``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.config import ModelConfig


def rms_norm_as_layer_norm(x: torch.Tensor, w2: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm of ``x [..., d]`` as one fused ``layer_norm`` over ``[x, -x]``; ``w2 = [weight, zeros]``."""
    d = x.shape[-1]
    return F.layer_norm(torch.cat((x, -x), -1), (2 * d,), w2, None, eps)[..., :d]


def rope_inv_freq(cfg: ModelConfig, factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]``; ``factors`` (GGUF ``rope_freqs``) divide them."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling
    if factors is not None:
        inv = inv / factors.to(torch.float64)
    elif rs is not None and rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs is not None and rs.rope_type == "llama3":
        low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
        wl = 2 * math.pi / inv
        smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        scaled = torch.where(wl > low_wl, inv / rs.factor, inv)
        mid = (wl <= low_wl) & (wl >= high_wl)
        scaled = torch.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
        inv = scaled
    return inv.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(i, i + head_dim/2)`` of ``x`` by the angles in ``cos, sin`` (broadcastable to ``x``).

    ``sin`` is in the signed form of :meth:`Transformer.rope_tables` (first half negated), which makes
    the rotate-half a single ``roll`` (4 ops instead of 7; exact). The model calls it on
    ``[batch, tokens, heads, head_dim]`` with ``cos, sin: [batch, tokens, 1, head_dim]``.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` runs: its first parameter's or buffer's device (a GGUF run as stored keeps its embedding
    as quantized blocks, with no ``weight``)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
