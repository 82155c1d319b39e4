"""The KV-cache policy interface: one small frozen dataclass per method, registered by name.

A policy plays one *role*, declared by a capability flag, and implements that role's hook:

================  ===========================================================================
flag              hook
================  ===========================================================================
``evicts``        :meth:`Evictor.on_prefill` / :meth:`Evictor.on_decode` return per-slot scores
                  ``[batch, kv_heads, slots]`` (higher = keep); the cache keeps the top ones and
                  really drops the others from storage.
``quantizes``     :meth:`Quantizer.make_store` returns the storage (packed codes + scales) that
                  holds every token of one layer.
``prunes_channels``  :meth:`ChannelPruner.on_prefill` returns the key channels kept per head.
``selects_prompt``   :meth:`PromptSelector.select` shortens the prompt before prefill.
================  ===========================================================================

A spec composes at most one policy per role (``snapkv:budget=0.25+kivi:bits=2``). Other flags tell
the cache what a policy needs, so the cache never asks ``isinstance``: ``needs_queries`` (keep the
prompt's queries for the hook), ``needs_scores`` (attention probabilities, computed by the policy
with :func:`attention_scores`), ``changes_positions`` (keys are re-rotated by slot index, so the
cache stores them unrotated), ``needs_layer_input`` (the store keeps X, not K/V) and
``evicts_during_decode`` (call :meth:`Evictor.on_decode` after every step). ``pages``: the policy also
runs on the continuous-batching engine (``engine/paged_cache.py``): at prefill it keeps the same number of
slots in every layer, so a sequence's kept keys/values compact into its first blocks and the rest of its
blocks go back to the pool. If it ``evicts_during_decode`` the sequence then holds its capacity plus one
slot: a sliding window (:attr:`Evictor.sliding_sinks`) writes each new token over its oldest slot after
the sinks; any other policy scores the slots after each step and the kept ones are compacted in place. A quantizer
that ``pages`` (KIVI) packs a sequence's oldest slots into pool blocks once its prompt is computed, alone or after
an evictor that compresses at prefill only (``kivi.PagedKIVI``, ``engine/packed_kv.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from frugallm.errors import FrugalError
from frugallm.registry import Registry

if TYPE_CHECKING:
    from frugallm.kv.stores import Store, StoreContext

KV_POLICIES: Registry[type[KVPolicy]] = Registry("KV policy")


class KVSpecError(FrugalError):
    """A ``--kv`` spec is malformed, names an unknown policy or composes policies that do not fit."""


@dataclass(frozen=True)
class KVPolicy:
    """Base of every policy: capability flags and a one-line description of the declared budget."""

    name: ClassVar[str] = ""
    evicts: ClassVar[bool] = False
    quantizes: ClassVar[bool] = False
    prunes_channels: ClassVar[bool] = False
    selects_prompt: ClassVar[bool] = False
    needs_queries: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    needs_layer_input: ClassVar[bool] = False
    evicts_during_decode: ClassVar[bool] = False
    pages: ClassVar[bool] = False

    @property
    def changes_positions(self) -> bool:
        """True when attention sees keys at positions other than the ones they were computed at."""
        return False

    def paging_error(self) -> str | None:
        """Why this configuration of a policy that ``pages`` cannot run on the paged engine (None: it can)."""
        return None

    def describe(self) -> str:
        """``name:param=value,...`` with the non-default parameters (round-trips through the parser)."""
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if f.init and getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(parts) if parts else "")

    def _fail(self, msg: str) -> None:
        raise KVSpecError(f"{self.name}: {msg}")

    def _check_fraction(self, param: str, value: float | None, *, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or not 0.0 < float(value) <= 1.0:
            self._fail(f"{param} must be in (0, 1] (fraction of tokens kept), got {value}")

    def _check_int(self, param: str, value: int | None, minimum: int, *, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or int(value) < minimum:
            self._fail(f"{param} must be an integer >= {minimum}, got {value}")


# -- contexts handed to the hooks --------------------------------------------------------------------------


@dataclass
class PrefillContext:
    """What a prefill hook sees for one layer, right after the prompt's keys/values exist.

    ``keys, values: [batch, kv_heads, T, head_dim]`` (keys RoPE-rotated), ``queries: [batch, heads, Q,
    head_dim]`` rotated queries of the prompt's last ``Q`` positions, ``Q >= prefill_queries(T)`` (None unless
    a policy ``needs_queries``; the static cache passes all ``T``, the paged engine its last chunk's),
    ``valid: bool [batch, T]``
    (False on left padding). ``stats`` holds per-slot tensors ``[batch, kv_heads, T]`` a policy wants
    kept in step with the slots (the cache gathers them on eviction).
    """

    layer: int
    num_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor | None
    valid: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    # Queries after the prompt's last one at the end of ``queries`` (SpecKV's lookahead on the paged engine, whose
    # pass holds the prompt's last chunk only); None: ``queries`` holds the whole prompt's and then any extra ones.
    lookahead: int | None = None


@dataclass
class DecodeContext:
    """What a decode hook sees for one layer after this step's tokens were appended.

    ``keys, values: [batch, kv_heads, N, head_dim]`` exactly what this step attends over (the
    dequantized old slots then the ``new_tokens`` exact new ones, keys rotated for this step's
    queries); ``queries: [batch, heads, new_tokens, head_dim]``; ``valid: bool [batch, N]``;
    ``capacity`` the slots the layer may keep after the step; ``stats`` per-slot tensors
    ``[batch, kv_heads, N - new_tokens]`` (the policy extends them to N).
    """

    layer: int
    num_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    valid: torch.Tensor
    capacity: int
    stats: dict[str, torch.Tensor]

    @property
    def new_tokens(self) -> int:
        return self.queries.shape[2]


# -- role bases ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evictor(KVPolicy):
    """Token eviction: keep ``budget`` of the prompt's tokens (scores decide which)."""

    evicts: ClassVar[bool] = True
    budget: float = 0.25

    def prefill_keep(self, n_tokens: int, layer: int, num_layers: int) -> int:
        """Slots a layer keeps after a prompt of ``n_tokens`` (at least one)."""
        return max(1, min(n_tokens, math.ceil(self.budget * n_tokens)))

    @property
    def sliding_sinks(self) -> int | None:
        """For an evictor whose decode eviction drops the oldest slot after its first ``sliding_sinks`` ones (a
        sliding window with attention sinks): that count; None for any other decode eviction."""
        return None

    def prefill_queries(self, n_tokens: int) -> int:
        """How many of the prompt's last queries :meth:`on_prefill` reads (all of them by default when it
        ``needs_queries``). The paged engine computes at least these in the pass that ends the prompt."""
        return n_tokens if self.needs_queries else 1

    def decode_capacity(self, kept: int) -> int:
        """Slots a layer may hold after each decode step (only used if ``evicts_during_decode``)."""
        return kept

    def decode_keep(self, n_slots: int, capacity: int) -> int:
        """Slots kept when a decode step overflows ``capacity`` (fewer than it compacts in chunks)."""
        return capacity

    def on_prefill(self, ctx: PrefillContext) -> torch.Tensor:
        """Scores ``[batch, kv_heads, T]``, higher = keep; ``+inf`` forces a slot to stay. Never ``-inf``."""
        raise NotImplementedError

    def on_decode(self, ctx: DecodeContext) -> torch.Tensor | None:
        """Scores ``[batch, kv_heads, N]`` after a decode step, or None to keep every slot this step."""
        return None


@dataclass(frozen=True)
class Quantizer(KVPolicy):
    """Stores every token of a layer in a compressed format (packed codes + scales)."""

    quantizes: ClassVar[bool] = True

    def make_store(self, ctx: StoreContext) -> Store:
        raise NotImplementedError


@dataclass(frozen=True)
class ChannelPruner(KVPolicy):
    """Drops key channels: the cache stores ``[batch, kv_heads, N, kept_channels]`` keys."""

    prunes_channels: ClassVar[bool] = True

    def on_prefill(self, ctx: PrefillContext) -> torch.Tensor:
        """Kept channel indices ``[batch, kv_heads, kept]`` (int64)."""
        raise NotImplementedError


@dataclass(frozen=True)
class PromptSelector(KVPolicy):
    """Shortens the prompt before the full model prefills it."""

    selects_prompt: ClassVar[bool] = True

    def select(self, model: Any, prompt_ids: list[int]) -> list[int]:
        raise NotImplementedError


# -- shared scoring helpers ----------------------------------------------------------------------------------


def windowed_keep(n_tokens: int, budget: float, window: int) -> int:
    """Tokens kept of ``n_tokens`` by a policy that always keeps its last ``window``: ``budget`` of them, at least
    the window, at most all (SnapKV, SpecKV, GemFilter, SpecPC)."""
    return min(n_tokens, max(math.ceil(budget * n_tokens), window))


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, q_offset: int, *, chunk: int = 256
) -> torch.Tensor:
    """Attention probabilities summed over queries and over the query heads of each KV group.

    ``q: [batch, heads, t, head_dim]`` queries at slots ``q_offset .. q_offset + t - 1`` (causal:
    query ``i`` sees keys ``j <= q_offset + i``); ``k: [batch, kv_heads, N, head_dim]``; ``valid:
    bool [batch, N]``. Returns fp32 ``[batch, kv_heads, N]``. Queries are processed ``chunk`` at a
    time so a long prompt never materializes the whole ``T x T`` matrix.
    """
    b, hq, t, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    kf = k.float()
    out = torch.zeros(b, hk, n, dtype=torch.float32, device=k.device)
    slots = torch.arange(n, device=k.device)
    for s in range(0, t, chunk):
        qc = q[:, :, s:s + chunk].float().view(b, hk, g, -1, d)
        logits = torch.einsum("bhgtd,bhnd->bhgtn", qc, kf) / math.sqrt(d)
        qpos = q_offset + s + torch.arange(qc.shape[3], device=k.device)
        allowed = (slots[None, :] <= qpos[:, None])[None, None, None]  # [1,1,1,t,N]
        if valid is not None:
            allowed = allowed & valid[:, None, None, None, :]
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        out += probs.sum((2, 3))
    return out


def recent_mask(valid: torch.Tensor, count: int) -> torch.Tensor:
    """bool ``[batch, N]``: the last ``count`` slots of each row (slots are in arrival order)."""
    n = valid.shape[1]
    return torch.arange(n, device=valid.device)[None, :].expand_as(valid) >= n - count


def first_valid_mask(valid: torch.Tensor, count: int) -> torch.Tensor:
    """bool ``[batch, N]``: the first ``count`` non-padding slots of each row (attention sinks)."""
    rank = valid.long().cumsum(1) - 1
    return valid & (rank < count)
