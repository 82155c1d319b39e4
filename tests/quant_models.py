"""A tiny stand-in for the real model with its module names (fused qkv / gate_up, optionally tied head).

Shared by the quantization tests: ``quantize_model`` and GPTQ only care about the names and shapes of the
linear layers, so a cheap block without attention keeps those tests fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, h: int, inter: int, kv: int) -> None:
        super().__init__()
        self.h, self.inter = h, inter
        self.qkv_proj = nn.Linear(h, h + 2 * kv, bias=True)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.gate_up_proj = nn.Linear(h, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qkv_proj(F.rms_norm(x, (self.h,)))[..., : self.h]
        x = x + self.o_proj(torch.tanh(q))
        gate, up = self.gate_up_proj(F.rms_norm(x, (self.h,))).split(self.inter, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class TinyLM(nn.Module):
    """``forward(ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(
        self, vocab: int = 256, h: int = 128, inter: int = 192, layers: int = 2, kv: int = 32, tied: bool = True
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(Block(h, inter, kv) for _ in range(layers))
        self.lm_head = nn.Linear(h, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(F.rms_norm(x, (x.shape[-1],)))
