"""SpecKV and SpecPC: a small draft model decides what the target may drop (Galim et al., 2025, "Draft-based
Approximate Inference for LLMs").

Both start the same way: the draft model (same vocabulary, e.g. Qwen2.5-Coder-0.5B for the 1.5B) reads the
prompt and greedily writes ``lookahead`` tokens, a cheap guess of what the target is about to say. Heuristics
such as SnapKV rank the prompt by the attention of its *last* tokens; these rank it by the attention of the
(approximate) *next* ones, which is what decoding will actually attend from.

* ``speckv`` (an evictor, like SnapKV): the target prefills the prompt followed by the draft's lookahead tokens
  (:func:`prefill_with_lookahead`); in every layer the queries of the last ``window`` prompt tokens and of the
  lookahead tokens vote over the prompt's keys (summed, max-pooled with ``kernel``), the top ``budget`` per KV
  head stay in the cache and the rest leave storage, exactly as SnapKV's do. The lookahead tokens' own
  keys/values are never stored and decoding starts right after the prompt, with the logits of its last token.
  Under continuous batching (``serve --kv speckv:...``) the engine's runner computes each prompt's last chunk (at
  least its last ``window`` tokens) in a pass of its own with the lookahead (:func:`lookahead_pass`), and the
  kept slots are compacted into fewer blocks.
* ``specpc`` (a prompt selector, like GemFilter): the draft's own attention, from its last ``window`` prompt
  queries and its lookahead queries, summed over all its layers and heads, max-pooled with ``kernel``, picks
  ``budget`` of the prompt tokens (the last ``window`` always kept); the target then prefills only those, so
  its prefill compute shrinks too.

The draft comes from the ``draft=`` parameter (a catalog name or a path) or, without it, from the LLM's
``spec=draft:model=...``; the engine loads it and registers it for the target with :func:`attach_draft`
(this layer cannot load models). Both compose with a quantizer: ``speckv:budget=0.25+kivi:bits=2``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.kv.policy import (
    KV_POLICIES,
    Evictor,
    KVPolicy,
    KVSpecError,
    PrefillContext,
    PromptSelector,
    attention_scores,
    windowed_keep,
)
from frugallm.kv.spec import KVSpec
from frugallm.model.kv_cache import ContiguousKVCache, KVCache
from frugallm.model.ops import model_device

# target model -> {draft name (None: the LLM's spec= draft): (draft model, KV dtype of its lookahead cache)}
_DRAFTS: weakref.WeakKeyDictionary[nn.Module, dict[str | None, tuple[nn.Module, torch.dtype]]] = (
    weakref.WeakKeyDictionary())


def draft_policies(spec: KVSpec | None) -> list[KVPolicy]:
    """The policies of ``spec`` that need a draft model (capability flag ``needs_draft``)."""
    return [p for p in (spec.policies if spec is not None else ()) if getattr(p, "needs_draft", False)]


def draft_name(spec: KVSpec | None, spec_draft: str | None) -> str | None:
    """The draft model ``spec`` needs (its ``draft=``, else ``spec_draft``: the LLM's ``spec=`` draft), or None
    when no policy needs one; a :class:`KVSpecError` when one is needed and none is named."""
    pols = draft_policies(spec)
    if not pols:
        return None
    names = {p.draft for p in pols if p.draft}  # type: ignore[attr-defined]
    if len(names) > 1:
        raise KVSpecError(f"{' and '.join(p.name for p in pols)} name different drafts ({', '.join(sorted(names))}); "
                          "one draft model serves both")
    name = names.pop() if names else spec_draft
    if name is None:
        p = pols[0].name
        raise KVSpecError(f"{p} needs a draft model with the target's vocabulary: {p}:draft=qwen2.5-coder-0.5b "
                          "(a catalog name or a path), or LLM(spec='draft:model=...')")
    return name


def attach_draft(target: nn.Module, draft: nn.Module, name: str | None, kv_dtype: torch.dtype) -> None:
    """Register ``draft`` (a ``llama.Transformer``) for the policies run on ``target``; ``name`` is what their
    ``draft=`` says (None: the draft of policies without ``draft=``)."""
    _DRAFTS.setdefault(target, {})[name] = (draft, kv_dtype)


def draft_for(target: nn.Module, policy: KVPolicy) -> tuple[nn.Module, torch.dtype]:
    """The draft model registered for ``target`` that ``policy`` asks for."""
    drafts = _DRAFTS.get(target, {})
    want = getattr(policy, "draft", None)
    found = drafts.get(want) or (drafts.get(None) if want is None else None)
    if found is None and want is None and len(drafts) == 1:
        found = next(iter(drafts.values()))
    if found is None:
        raise KVSpecError(f"{policy.name}: no draft model is loaded for this model (LLM(kv=...) loads the one "
                          f"{policy.name}:draft=NAME names)")
    return found


# -- the draft's lookahead ------------------------------------------------------------------------------------


class _AttentionRecorder(KVCache):
    """The draft's contiguous cache; with ``record`` it also sums, per layer, the attention that the last
    ``window`` prompt queries (prefill) and every lookahead query put on the first ``prompt`` slots.
    ``scores [batch, prompt]`` (fp32): summed over layers, heads and queries."""

    def __init__(self, inner: ContiguousKVCache, prompt: int, window: int, record: bool) -> None:
        self.inner, self.prompt, self.window, self.record = inner, prompt, window, record
        self.scores: torch.Tensor | None = None

    def update(self, layer, k, v, *, q=None, x=None, positions=None):  # noqa: ANN001, ANN201
        keys, values, mask = self.inner.update(layer, k, v, q=q, x=x, positions=positions)
        if self.record and q is not None:
            n, t = keys.shape[2], q.shape[2]
            obs = q[:, :, t - min(self.window, t):]
            valid = torch.arange(n, device=keys.device)[None, :] >= self.inner.pad_lens[:, None]
            s = attention_scores(obs, keys, valid, q_offset=n - obs.shape[2])[..., : self.prompt].sum(1)
            self.scores = s if self.scores is None else self.scores + s
        return keys, values, mask

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def reserved_bytes(self) -> int:
        return self.inner.reserved_bytes()

    @property
    def num_slots(self) -> int:
        return self.inner.num_slots


@torch.inference_mode()
def draft_lookahead(
    draft: nn.Module,
    kv_dtype: torch.dtype,
    ids: torch.Tensor,
    positions: torch.Tensor,
    pad_lens: list[int] | None,
    n: int,
    vocab: int,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draft reads ``ids [B, T]`` (left padded by ``pad_lens``) and writes ``n`` greedy tokens.

    Returns ``(tokens [B, n] int64, scores [B, T] fp32 or None)``: ``scores`` (with ``window > 0``) is the
    attention of its last ``window`` prompt queries and of its lookahead queries on each prompt token, summed
    over layers and heads. Draft logits are cut to the target's ``vocab``. The draft's cache is freed on return.
    """
    b, t = ids.shape
    cfg = draft.config
    if int(positions.max()) + n + 1 > cfg.max_position_embeddings:
        raise KVSpecError(f"the draft model's context ({cfg.max_position_embeddings} tokens) is shorter than this "
                          f"prompt ({int(positions.max()) + 1} tokens) and its {n}-token lookahead; use a draft with "
                          "the target's context")
    dev = model_device(draft)
    ids, positions = ids.to(dev), positions.to(dev)
    draft.rope_tables(dev, int(positions.max()) + n + 1)
    inner = ContiguousKVCache(len(draft.layers), b, cfg.num_kv_heads, cfg.head_dim, t + n, kv_dtype, dev,
                              pad_lens if pad_lens and any(pad_lens) else None)
    cache = _AttentionRecorder(inner, t, window, window > 0)
    logits = draft(ids, positions, cache, "last")
    if n == 0:
        return torch.empty(b, 0, dtype=torch.long, device=dev), cache.scores
    nxt = positions[:, -1:] + 1
    out = []
    for i in range(n):
        tok = logits[:, :vocab].argmax(-1)
        out.append(tok)
        if i < n - 1 or window > 0:  # the last token's query only matters to the attention scores
            logits = draft(tok[:, None], nxt, cache, "last")
            nxt = nxt + 1
    return torch.stack(out, 1), cache.scores


def _pooled(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool ``scores [..., N]`` along N with an odd ``kernel`` (neighbours of a kept token survive with it)."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    return F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).view(shape)


class _LookaheadPrefill(KVCache):
    """Wraps the target's cache for one prefill pass over ``prompt`` tokens followed by lookahead tokens: the
    wrapped cache stores (and its evictor compresses) the prompt's slots only, handed every query (prompt and
    lookahead) so that the lookahead's queries can vote; attention in this pass sees everything, causally.

    ``extend``: the pass is a prompt's last chunk on a cache that returns every slot the row attends over (the
    paged engine's, one row): the lookahead's keys/values go after those. Otherwise the pass holds whole prompts
    and attends over its own keys/values (a compressing cache returns only what it kept)."""

    def __init__(self, inner: KVCache, prompt: int, pad_lens: list[int] | None, extend: bool = False) -> None:
        self.inner, self.prompt, self.extend = inner, prompt, extend
        self.pad = pad_lens if pad_lens and any(pad_lens) else None

    def update(self, layer, k, v, *, q=None, x=None, positions=None):  # noqa: ANN001, ANN201
        p = self.prompt
        keys, values, _ = self.inner.update(layer, k[:, :, :p], v[:, :, :p], q=q, x=None if x is None else x[:, :p],
                                            positions=None if positions is None else positions[:, :p])
        if self.extend and keys.shape[2] > p:  # earlier chunks' slots first: causal with their offset
            assert self.pad is None and k.shape[0] == 1, "a paged lookahead pass holds one unpadded row"
            keys = torch.cat([keys, k[:, :, p:].to(keys.dtype)], 2)
            values = torch.cat([values, v[:, :, p:].to(values.dtype)], 2)
            n, t = keys.shape[2], k.shape[2]
            visible = torch.arange(n, device=k.device)[None, :] <= torch.arange(n - t, n, device=k.device)[:, None]
            mask = torch.zeros(visible.shape, device=k.device).masked_fill_(~visible, float("-inf"))
            return keys, values, mask[None, None]
        mask = None
        if self.pad is not None:  # causal, never a padding slot (a padded query row sees itself)
            n = k.shape[2]
            slots = torch.arange(n, device=k.device)
            valid = slots[None, :] >= torch.tensor(self.pad, device=k.device)[:, None]
            mask = (slots[None, :] <= slots[:, None])[None] & valid[:, None, :]
            mask |= torch.eye(n, dtype=torch.bool, device=k.device)[None]
            mask = mask[:, None]
        return k, v, mask

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def reserved_bytes(self) -> int:
        return self.inner.reserved_bytes()

    @property
    def num_slots(self) -> int:
        return self.inner.num_slots


def lookahead_pass(
    ev: Any, target: nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
    pad_lens: list[int] | None = None, prompt: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, KVCache] | None:
    """The inputs of SpecKV's prefill pass over ``ids [B, T]`` at ``positions [B, T]``, which end the prompts:
    ``(ids [B, T + L], positions [B, T + L], cache)``, the draft's ``L`` lookahead tokens after the prompt and
    ``cache`` wrapped so that it stores the prompt's keys/values only and hands its evictor every query; None when
    evictor ``ev`` has no lookahead. Take the logits of position ``T - 1``.

    Whole prompts (left padded by ``pad_lens``): the static cache (:func:`prefill_with_lookahead`). ``prompt``:
    the pass is the last chunk of this one prompt (``B == 1``) on the paged engine, whose cache returns every slot
    of the row; the draft reads the whole ``prompt``."""
    look = getattr(ev, "lookahead", 0) if getattr(ev, "needs_draft", False) else 0
    # The lookahead must fit the target's positions (a prompt at the context's end gets a shorter one).
    look = max(0, min(look, target.config.max_position_embeddings - int(positions.max()) - 1))
    if not look:
        return None
    draft, kv_dtype = draft_for(target, ev)
    if prompt is None:
        tokens, _ = draft_lookahead(draft, kv_dtype, ids, positions, pad_lens, look, target.config.vocab_size)
    else:
        whole = torch.tensor([prompt], device=ids.device)
        tokens, _ = draft_lookahead(draft, kv_dtype, whole, torch.arange(len(prompt), device=ids.device)[None],
                                    None, look, target.config.vocab_size)
    tokens = tokens.to(ids.device)
    steps = torch.arange(1, look + 1, device=ids.device)[None]
    all_ids = torch.cat([ids, tokens], 1)
    all_pos = torch.cat([positions, positions[:, -1:] + steps], 1)
    target.rope_tables(ids.device, int(all_pos.max()) + 1)
    return all_ids, all_pos, _LookaheadPrefill(cache, ids.shape[1], pad_lens, extend=prompt is not None)


@torch.inference_mode()
def prefill_with_lookahead(
    spec: KVSpec, target: nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
    pad_lens: list[int] | None = None,
) -> torch.Tensor:
    """The prefill of ``ids [B, T]`` at ``positions [B, T]`` into ``cache``; logits ``[B, vocab]`` of the last
    prompt token. With a SpecKV evictor the draft's lookahead tokens follow the prompt in the same pass (their
    queries vote, their keys/values are not kept); otherwise a plain prefill."""
    look = lookahead_pass(spec.evictor, target, ids, positions, cache, pad_lens)
    if look is None:
        return target(ids, positions, cache, "last")
    b, t = ids.shape
    last = torch.full((b,), t - 1, dtype=torch.long, device=ids.device)
    return target(*look, last)


# -- the policies ------------------------------------------------------------------------------------------------


def _check_params(p: Any, min_lookahead: int, unit: str) -> None:
    """The parameters SpecKV and SpecPC share (``p``: either policy)."""
    p._check_fraction("budget", p.budget)
    p._check_int("lookahead", p.lookahead, min_lookahead)
    p._check_int("window", p.window, 1)
    p._check_int("kernel", p.kernel, 1)
    if p.kernel % 2 == 0:
        p._fail(f"kernel must be odd (pooling keeps {unit} alignment), got {p.kernel}")


@KV_POLICIES.register("speckv")
@dataclass(frozen=True)
class SpecKV(Evictor):
    """``speckv:budget=0.25,lookahead=16,window=16,kernel=5,draft=NAME`` (see the module docstring).

    ``lookahead``: draft tokens whose target queries vote; ``window``: the last prompt tokens, always kept, whose
    queries vote too; ``draft``: the draft model (default: the LLM's ``spec=`` draft).
    """

    name: ClassVar[str] = "speckv"
    needs_queries: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = True
    needs_draft: ClassVar[bool] = True
    # On the paged engine a prompt's last chunk (at least its last `window` tokens) runs alone with the lookahead
    # (engine/model_runner.py); the kept slots are compacted as SnapKV's.
    pages: ClassVar[bool] = True
    budget: float = 0.25
    lookahead: int = 16
    window: int = 16
    kernel: int = 5
    draft: str | None = None

    def __post_init__(self) -> None:
        _check_params(self, min_lookahead=1, unit="slot")

    def prefill_keep(self, n_tokens: int, layer: int, num_layers: int) -> int:
        return windowed_keep(n_tokens, self.budget, self.window)

    def prefill_queries(self, n_tokens: int) -> int:
        return min(self.window, n_tokens)

    def on_prefill(self, ctx: PrefillContext) -> torch.Tensor:
        """``ctx.queries [b, heads, Q + L, d]``: the prompt's last ``Q`` queries (the static cache passes all ``T``;
        the paged engine its last chunk's, ``Q >= window``) and then the ``L`` lookahead tokens' (``ctx.lookahead``,
        else ``Q + L - T``; ``L`` is 0 without a lookahead, and this is SnapKV's vote)."""
        t = ctx.keys.shape[2]
        qn = ctx.queries.shape[2]
        extra = ctx.lookahead if ctx.lookahead is not None else max(0, qn - t)
        w = min(self.window, t)
        obs = ctx.queries[:, :, qn - extra - w:]  # the last w prompt queries, then the lookahead's
        votes = attention_scores(obs, ctx.keys, ctx.valid, q_offset=t - w)  # [b, h, T]
        b, h, _ = votes.shape
        prefix = _pooled(votes[:, :, : t - w], self.kernel)
        window = torch.full((b, h, w), float("inf"), device=votes.device)
        return torch.cat([prefix, window], dim=2)


@KV_POLICIES.register("specpc")
@dataclass(frozen=True)
class SpecPC(PromptSelector):
    """``specpc:budget=0.25,lookahead=8,window=16,kernel=7,draft=NAME`` (see the module docstring).

    ``select`` is handed the *target* model and finds its draft with :func:`draft_for`.
    """

    name: ClassVar[str] = "specpc"
    needs_queries: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = True
    needs_draft: ClassVar[bool] = True
    budget: float = 0.25
    lookahead: int = 8
    window: int = 16
    kernel: int = 7
    draft: str | None = None

    def __post_init__(self) -> None:
        _check_params(self, min_lookahead=0, unit="token")

    def scores(self, target: Any, prompt_ids: list[int]) -> torch.Tensor:
        """``[T]`` fp32: the draft's attention on each prompt token (higher = keep)."""
        draft, kv_dtype = draft_for(target, self)
        dev = model_device(draft)
        ids = torch.tensor([prompt_ids], device=dev)
        pos = torch.arange(len(prompt_ids), device=dev)[None]
        _, s = draft_lookahead(draft, kv_dtype, ids, pos, None, self.lookahead, target.config.vocab_size,
                               window=self.window)
        assert s is not None
        return s[0]

    @torch.inference_mode()
    def select(self, model: Any, prompt_ids: list[int]) -> list[int]:
        n = len(prompt_ids)
        k = windowed_keep(n, self.budget, self.window)
        if k >= n:
            return list(prompt_ids)
        s = _pooled(self.scores(model, prompt_ids), self.kernel)
        s[max(0, n - self.window):] = float("inf")
        keep = s.topk(k).indices.sort().values.tolist()
        return [prompt_ids[i] for i in keep]
