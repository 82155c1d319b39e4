"""Per-layer token storage used by :class:`~frugallm.kv.cache.CompressedKVCache`.

A store holds the slots of one layer in its own format (plain tensors here; packed codes in
``kivi.py`` and ``xquant.py``), gives back a dequantized copy for attention and physically drops
evicted slots, so ``nbytes`` always reflects what is really kept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from frugallm.kv.quantize import nbytes


@dataclass(frozen=True)
class StoreContext:
    """Everything a quantizer needs to build the store of one layer.

    ``key_dim``: channels stored per key (``head_dim`` unless a channel pruner dropped some);
    ``frame``: ``"rotated"`` (keys as the model rotated them) or ``"raw"`` (unrotated: the cache
    rotates them by slot index); ``attn``: the layer's attention module (for stores that
    rematerialize K/V); ``max_residual``: cap on a quantizer's full-precision window (set when a
    decode-time evictor holds the layer at a fixed size, so the window cannot crowd its choices out);
    ``rope``: ``(cos, sin)`` tables ``[max_pos, head_dim]``.
    """

    layer: int
    batch: int
    kv_heads: int
    head_dim: int
    key_dim: int
    dtype: torch.dtype
    device: torch.device
    frame: str = "rotated"
    max_residual: int | None = None
    attn: Any = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


class Store(ABC):
    """Slots of one layer. ``k: [batch, kv_heads, t, key_dim]``, ``v: [batch, kv_heads, t, head_dim]``."""

    per_head: bool = True  # gather() accepts different slots per KV head
    exact: bool = False  # materialize() returns exactly what was appended (attention may read it in place)
    stores_keys: bool = True  # False: keys are rebuilt from the layer input x (append ignores k, v)

    @property
    @abstractmethod
    def num_slots(self) -> int: ...

    @property
    def protected(self) -> int:
        """Trailing slots eviction must keep (a full-precision window not yet quantized)."""
        return 0

    @property
    def pinned(self) -> int:
        """Leading slots eviction must keep (attention sinks a quantizer stores exact)."""
        return 0

    @abstractmethod
    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None, positions: torch.Tensor) -> None:
        """Append ``t`` slots; ``x: [batch, t, hidden]``, ``positions: [batch, t]`` RoPE positions."""

    @abstractmethod
    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(keys, values)`` of every slot, keys in the store's frame."""

    @abstractmethod
    def gather(self, idx: torch.Tensor) -> None:
        """Keep only slots ``idx: [batch, kv_heads or 1, keep]`` (ascending per row/head)."""

    @abstractmethod
    def nbytes(self) -> int: ...

    def reserved_bytes(self) -> int:
        return self.nbytes()


def gather_slots(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t: [B, H, N, D]``, ``idx: [B, H or 1, keep]`` -> ``[B, H, keep, D]``."""
    b, h, _, d = t.shape
    return torch.gather(t, 2, idx[..., None].expand(b, h, idx.shape[2], d))


class FullStore(Store):
    """Plain tensors in the cache dtype, grown by doubling; eviction copies the kept slots out."""

    exact = True

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n = 0

    @property
    def num_slots(self) -> int:
        return self.n

    def _ensure(self, needed: int) -> None:
        c = self.ctx
        cap = 0 if self.k is None else self.k.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed + 16, 2 * cap)
        k = torch.empty(c.batch, c.kv_heads, new_cap, c.key_dim, dtype=c.dtype, device=c.device)
        v = torch.empty(c.batch, c.kv_heads, new_cap, c.head_dim, dtype=c.dtype, device=c.device)
        if self.k is not None:
            k[:, :, :self.n] = self.k[:, :, :self.n]
            v[:, :, :self.n] = self.v[:, :, :self.n]
        self.k, self.v = k, v

    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None, positions: torch.Tensor) -> None:
        t = k.shape[2]
        self._ensure(self.n + t)
        self.k[:, :, self.n:self.n + t] = k
        self.v[:, :, self.n:self.n + t] = v
        self.n += t

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            c = self.ctx
            return (torch.empty(c.batch, c.kv_heads, 0, c.key_dim, dtype=c.dtype, device=c.device),
                    torch.empty(c.batch, c.kv_heads, 0, c.head_dim, dtype=c.dtype, device=c.device))
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

    def gather(self, idx: torch.Tensor) -> None:
        # New tensors (not in place): the previous views may still be in use by this step's attention.
        cap = self.k.shape[2]
        k, v = gather_slots(self.k[:, :, :self.n], idx), gather_slots(self.v[:, :, :self.n], idx)
        self.n = k.shape[2]
        self.k = torch.cat([k, k.new_empty(*k.shape[:2], cap - self.n, k.shape[3])], dim=2)
        self.v = torch.cat([v, v.new_empty(*v.shape[:2], cap - self.n, v.shape[3])], dim=2)

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        per_slot = (self.k.shape[3] + self.v.shape[3]) * self.k.shape[0] * self.k.shape[1] * self.k.element_size()
        return self.n * per_slot

    def reserved_bytes(self) -> int:
        return nbytes(self.k, self.v)
