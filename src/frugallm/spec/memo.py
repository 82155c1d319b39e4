"""SpecMemo accounting: the memory one speculative request holds, in bytes and in blocks of a KV pool.

Speculation decodes a lone request on contiguous caches (``engine/spec_solo.py``): the target's, sized for the
prompt, the output and the ``k + 1`` candidates of a verify pass, and, for ``draft`` / ``self``, the draft model's.
The server charges these to its paged pool (one budget: ``--kv-memory`` bounds them too), so they are planned
here before anything is allocated, from the same shapes ``ContiguousKVCache`` allocates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from frugallm.spec.config import SpecConfig


def kv_bytes(layers: int, kv_heads: int, head_dim: int, slots: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values for ``slots`` tokens in a contiguous cache of these shapes."""
    return 2 * layers * kv_heads * head_dim * slots * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoPlan:
    """Bytes one speculative request holds outside the paged pool.

    ``target_kv``: the target's cache for prompt + output (what decoding it without speculation holds too);
    ``candidates_kv``: its ``k + 1`` extra slots for a verify pass's candidates; ``logits``: that pass's fp32
    ``[k + 1, vocab]`` logits; ``draft_kv``: the draft model's cache (0 for ``ngram``).
    """

    target_kv: int
    candidates_kv: int
    logits: int
    draft_kv: int

    @property
    def request_bytes(self) -> int:
        """Held for the request's whole life (its cache with the candidate slots, the verify logits)."""
        return self.target_kv + self.candidates_kv + self.logits

    @property
    def spec_bytes(self) -> int:
        """What speculation adds to decoding the request without it (draft weights aside)."""
        return self.candidates_kv + self.logits + self.draft_kv


def plan(cfg: SpecConfig, target: Any, draft: Any | None, prompt_len: int, max_new: int,
         kv_dtype: torch.dtype) -> MemoPlan:
    """The :class:`MemoPlan` of one request: ``target`` / ``draft`` are ``ModelConfig``s (``draft`` for
    ``cfg.method == "draft"``); the caches hold ``prompt_len + max_new + k + 1`` slots, as the solo loop
    sizes them (``SoloRunner._run``)."""
    cap = prompt_len + max_new
    kv = lambda c, layers, n: kv_bytes(layers, c.num_kv_heads, c.head_dim, n, kv_dtype)  # noqa: E731
    draft_kv = 0
    if cfg.method == "self":
        layers = cfg.layers if cfg.layers is not None else max(1, target.num_layers // 2)
        draft_kv = kv(target, layers, cap + cfg.k + 1)
    elif cfg.method == "draft":
        assert draft is not None, "draft: the draft model's config is needed"
        draft_kv = kv(draft, draft.num_layers, cap + cfg.k + 1)
    return MemoPlan(
        target_kv=kv(target, target.num_layers, cap),
        candidates_kv=kv(target, target.num_layers, cfg.k + 1),
        logits=(cfg.k + 1) * target.vocab_size * 4,
        draft_kv=draft_kv,
    )


def blocks_for_bytes(nbytes: int, bytes_per_block: int) -> int:
    """Pool blocks covering ``nbytes``."""
    return -(-nbytes // bytes_per_block)
