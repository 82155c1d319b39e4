"""``LoraManager``: registered adapters, the slots they are loaded into (LRU, ``max_loras``), and each forward's
row -> adapter binding.

Adapters are registered by name (``add``: read and checked, then dropped) and loaded into a slot of every
``LoraLinear`` when a batch first uses them (``bind``); when all ``max_loras`` slots are taken the least recently
used adapter not in the batch is evicted (its memory is reused) and loaded again from its folder when a later
request names it. Only the engine thread calls ``bind`` (slots change there alone); ``add`` / ``remove`` /
``get`` may run on any thread.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.lora.adapter import LoraAdapter, fused_layout
from frugallm.lora.config import MAX_RANK
from frugallm.lora.layer import LoraContext, LoraLinear
from frugallm.lora.punica import LoraBatch

MAX_LORAS = 256


@dataclass(frozen=True)
class LoraRequest:
    """A registered adapter (vLLM's ``LoRARequest``): ``lora_id`` is unique per registration, so a name
    registered again with other weights never shares cached prefixes with the old one."""

    name: str
    lora_id: int
    path: Path
    rank: int


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for attr in dotted.split("."):
        root = getattr(root, attr)
    return root


def _set(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, attr = dotted.rpartition(".")
    setattr(_get(root, parent) if parent else root, attr, value)


class LoraManager:
    """Adds ``max_loras`` slots of rank ``max_lora_rank`` to every projection of ``model`` (a
    ``llama.Transformer``) in ``dtype``, and serves the adapters registered with :meth:`add`."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, max_loras: int = 4, max_lora_rank: int = 16,
                 dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(max_loras, int) or not 1 <= max_loras <= MAX_LORAS:
            raise FrugalError(f"max_loras must be an integer in [1, {MAX_LORAS}], got {max_loras!r}")
        if not isinstance(max_lora_rank, int) or not 1 <= max_lora_rank <= MAX_RANK:
            raise FrugalError(f"max_lora_rank must be an integer in [1, {MAX_RANK}], got {max_lora_rank!r}")
        self.cfg, self.max_loras, self.max_lora_rank = cfg, max_loras, max_lora_rank
        self.ctx = LoraContext()
        self.modules: dict[tuple[int, str], LoraLinear] = {}
        for i, block in enumerate(model.layers):
            for name, (fan_in, parts) in fused_layout(cfg).items():
                base = _get(block, name)
                if isinstance(base, LoraLinear):
                    raise FrugalError("the model already has LoRA slots")
                wrapped = LoraLinear(base, fan_in, parts, max_loras, max_lora_rank, dtype, self.ctx)
                _set(block, name, wrapped)
                self.modules[(i, name)] = wrapped
        self.adapters: dict[str, LoraRequest] = {}
        self.slots: OrderedDict[int, int] = OrderedDict()  # lora_id -> slot, least recently used first
        self.dora: dict[int, bool] = {}  # slot -> holds a DoRA adapter
        self.free = list(range(max_loras - 1, -1, -1))
        self.loads = 0  # adapters read into slots (first uses and reloads after eviction)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- registry (any thread) -----------------------------------------------------------------------------
    def add(self, name: str, path: str | Path) -> LoraRequest:
        """Register the PEFT adapter folder ``path`` as ``name`` (checked against the model now)."""
        if not isinstance(name, str) or not name or len(name) > 256:
            raise FrugalError(f"LoRA adapter name must be a non-empty string of at most 256 characters, got {name!r}")
        adapter = LoraAdapter.load(path, self.cfg)
        if adapter.rank > self.max_lora_rank:
            raise FrugalError(f"LoRA adapter {name!r} has rank {adapter.rank}, above max_lora_rank "
                              f"{self.max_lora_rank} (raise --max-lora-rank, at most {MAX_RANK})")
        with self._lock:
            if name in self.adapters:
                raise FrugalError(f"a LoRA adapter named {name!r} is already loaded")
            req = LoraRequest(name, next(self._ids), adapter.path, adapter.rank)
            self.adapters[name] = req
        return req

    def remove(self, name: str) -> LoraRequest:
        """Unregister ``name`` (requests already running with it finish with it)."""
        with self._lock:
            if name not in self.adapters:
                raise InvalidRequestError(self._unknown(name))
            return self.adapters.pop(name)

    def get(self, name: str) -> LoraRequest:
        with self._lock:
            req = self.adapters.get(name)
            if req is None:
                raise InvalidRequestError(self._unknown(name))
            return req

    def names(self) -> list[str]:
        with self._lock:
            return list(self.adapters)

    def _unknown(self, name: str) -> str:
        known = ", ".join(sorted(self.adapters)) or "none are loaded"
        return f"unknown LoRA adapter {name!r} (loaded adapters: {known})"

    # -- slots (engine thread) -----------------------------------------------------------------------------
    def bind(self, rows: Sequence[LoraRequest | None], tokens_per_row: int = 1) -> None:
        """Set the adapter of each of ``len(rows)`` sequences (``tokens_per_row`` activation rows each) for the
        next forward passes, loading adapters that are not in a slot."""
        used = list(dict.fromkeys(r for r in rows if r is not None))
        if not used:
            self.ctx.batch = None
            return
        if len(used) > self.max_loras:
            raise InvalidRequestError(f"{len(used)} different LoRA adapters in one batch, max_loras is "
                                      f"{self.max_loras}")
        keep = {r.lora_id for r in used}
        slot_of = {r.lora_id: self._ensure(r, keep) for r in used}
        none = self.max_loras
        index = torch.tensor([none if r is None else slot_of[r.lora_id] for r in rows])
        if tokens_per_row > 1:
            index = index.repeat_interleave(tokens_per_row)
        lo, hi = min(slot_of.values()), max(slot_of.values()) + 1
        pool = next(iter(self.modules.values())).a_pool
        rows_with = (index != none).nonzero().flatten()
        mask = torch.zeros(index.numel(), hi - lo, dtype=pool.dtype)
        mask[rows_with, index[rows_with] - lo] = 1
        dora = any(self.dora.get(s, False) for s in range(lo, hi))
        self.ctx.batch = LoraBatch(mask.to(pool.device), index.to(pool.device), lo, hi, dora)

    def clear(self) -> None:
        self.ctx.batch = None

    @contextlib.contextmanager
    def bound(self, rows: Sequence[LoraRequest | None], tokens_per_row: int = 1) -> Iterator[None]:
        """:meth:`bind` for the forward passes inside the ``with`` block, cleared after it."""
        self.bind(rows, tokens_per_row)
        try:
            yield
        finally:
            self.clear()

    def _ensure(self, req: LoraRequest, keep: set[int]) -> int:
        slot = self.slots.get(req.lora_id)
        if slot is not None:
            self.slots.move_to_end(req.lora_id)
            return slot
        adapter = LoraAdapter.load(req.path, self.cfg)
        if self.free:
            slot = self.free.pop()
        else:
            victim = next(i for i in self.slots if i not in keep)  # exists: len(keep) <= max_loras
            slot = self.slots.pop(victim)
            for m in self.modules.values():
                m.clear(slot)
        by_module: dict[tuple[int, str], dict[int, object]] = {}
        for (layer, module, part), w in adapter.weights.items():
            by_module.setdefault((layer, module), {})[part] = w
        for key, factors in by_module.items():
            self.modules[key].place(slot, factors)  # type: ignore[arg-type]
        self.dora[slot] = adapter.config.use_dora
        self.slots[req.lora_id] = slot
        self.loads += 1
        return slot
