"""KV-cache interface and the contiguous implementation.

The attention layer only calls :meth:`KVCache.update` (append this step's keys/values and get back
what the queries may see, plus a mask) so the model does not depend on one cache layout: compressed,
quantized or paged caches implement the same three methods.

Slots versus positions: a cache stores keys/values in *slots*. Slot order is the order tokens were
appended, so causality holds in slot space even when a policy evicts or compacts slots. RoPE
positions are handled by the model (keys are stored rotated), never derived from slot indices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def sdpa_dtypes(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, decode: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dtype for SDPA over what :meth:`KVCache.update` returned. Decode passes (few queries) attend in
    the cache's dtype, or in fp32 for a half-precision cache on CPU, where half SDPA with a one-token
    query is 4-10x slower than fp32 (150 vs 24 us at 200 keys); prefill passes attend in the queries'."""
    if not decode:
        return q, keys.to(q.dtype), values.to(q.dtype)
    if keys.device.type == "cpu" and keys.dtype in (torch.float16, torch.bfloat16):
        return q.float(), keys.float(), values.float()
    return q.to(keys.dtype), keys, values


class KVCache(ABC):
    """Keys/values of every layer for a batch of sequences.

    Shapes: ``k, v: [batch, num_kv_heads, new_tokens, head_dim]``.
    """

    @abstractmethod
    def update(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append ``k, v`` for ``layer`` and return ``(keys, values, mask)`` to attend over.

        Extra inputs, for policies that need them (plain caches ignore them): ``q`` this step's
        rotated queries ``[batch, num_heads, new_tokens, head_dim]`` (attention-score based eviction),
        ``x`` the normalised layer input ``[batch, new_tokens, hidden]`` (caches that store X and
        rematerialise K/V), ``positions`` ``[batch, new_tokens]`` RoPE positions.

        ``keys, values: [batch, num_kv_heads, visible, head_dim]``; ``mask`` is ``None`` when plain
        causal attention over all visible slots is right, else a ``[batch, 1, new_tokens, visible]``
        tensor for SDPA: bool (True = may attend) or additive float (0 / -inf, which SDPA takes without
        converting it in every layer).
        """

    # True when ``update``'s slots are the sequence's tokens in order, every one visible to the queries after it
    # (no padding, eviction or re-selection): a few-token pass may then attend row by row as one-token steps do.
    causal_rows = False

    def decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """Optional fused path for one-token queries: append ``k, v`` and attend in one kernel.

        ``q [batch, num_heads, 1, head_dim]``, ``k, v [batch, num_kv_heads, 1, head_dim]`` -> the attention
        output ``[batch, num_heads, 1, head_dim]`` (any float dtype), or None, the default, when this cache
        has no such path for this pass; the model then calls :meth:`update` and runs SDPA itself.
        """
        return None

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of cache storage actually holding tokens (not merely reserved)."""

    @abstractmethod
    def reserved_bytes(self) -> int:
        """Bytes of storage allocated for the cache."""

    @property
    @abstractmethod
    def num_slots(self) -> int:
        """Slots filled so far in layer 0 (equals tokens seen for an uncompressed cache)."""


class ContiguousKVCache(KVCache):
    """Preallocated ``[batch, heads, capacity, head_dim]`` buffers per layer (gpt-fast style).

    Supports left padding for batched prompts: ``pad_lens[b]`` leading slots of row ``b`` are never
    attended to. Capacity grows by doubling if a caller under-reserves.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pad_lens: list[int] | None = None,
    ) -> None:
        shape = (batch, num_kv_heads, max(capacity, 1), head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.batch = batch
        self.pad_lens = torch.tensor(pad_lens or [0] * batch, device=device)
        self._has_pad = bool(pad_lens and any(pad_lens))
        self.causal_rows = not self._has_pad
        self._mask_key: tuple[int, int] | None = None
        self._mask: torch.Tensor | None = None

    def _grow(self, layer: int, needed: int) -> None:
        cap = self.k[layer].shape[2]
        new_cap = max(needed, 2 * cap)
        for buf in (self.k, self.v):
            old = buf[layer]
            new = old.new_empty(old.shape[0], old.shape[1], new_cap, old.shape[3])
            new[:, :, :cap] = old
            buf[layer] = new

    def _build_mask(self, start: int, q: int, total: int) -> torch.Tensor | None:
        if not self._has_pad and (q == 1 or start == 0):
            return None  # causal (prefill) or unmasked (single-token decode)
        key = (start, q)
        if self._mask_key != key:  # identical for every layer of one step: build once
            dev = self.pad_lens.device
            slots = torch.arange(total, device=dev)
            qpos = torch.arange(start, start + q, device=dev)
            causal = slots[None, :] <= qpos[:, None]  # [q, total]
            valid = slots[None, :] >= self.pad_lens[:, None]  # [batch, total]
            mask = causal[None, :, :] & valid[:, None, :]
            # A fully padded query row would give NaN in softmax; let it see itself.
            mask |= slots[None, None, :] == qpos[None, :, None]
            self._mask = mask[:, None]
            self._mask_key = key
        return self._mask

    def update(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        start = self.lengths[layer]
        t = k.shape[2]
        end = start + t
        kb, vb = self.k[layer], self.v[layer]
        if end > kb.shape[2]:
            self._grow(layer, end)
            kb, vb = self.k[layer], self.v[layer]
        # narrow + copy_: two ops where slice assignment takes several (batch-1 decode is op bound)
        kb.narrow(2, start, t).copy_(k)
        vb.narrow(2, start, t).copy_(v)
        self.lengths[layer] = end
        return kb.narrow(2, 0, end), vb.narrow(2, 0, end), self._build_mask(start, t, end)

    def nbytes(self) -> int:
        total = 0
        for layer, n in enumerate(self.lengths):
            b, h, _, d = self.k[layer].shape
            total += 2 * b * h * n * d * self.k[layer].element_size()
        return total

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def num_slots(self) -> int:
        return self.lengths[0]

    def truncate(self, length: int) -> None:
        """Drop slots past ``length`` in every layer (used to roll back rejected draft tokens)."""
        self.lengths = [min(n, length) for n in self.lengths]
        self._mask_key = None
