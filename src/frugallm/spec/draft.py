"""Model proposers: ``draft`` (a separate small model of the same vocabulary) and ``self`` (the target's own
first layers with its final norm and head, LayerSkip-style early exit without extra weights).

Both run a model autoregressively on their own contiguous KV cache, which ``rollback`` truncates to the
tokens that survived verification, so the next round only feeds what the draft has not seen (the target's
correction, and the last draft token when every guess was accepted).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from frugallm.model.kv_cache import ContiguousKVCache
from frugallm.model.ops import model_device
from frugallm.sampling import SamplingParams, filter_logits
from frugallm.spec.config import SpecError
from frugallm.spec.proposer import PROPOSERS, Draft, Proposer


class ModelProposer(Proposer):
    """Drafts with ``model`` (a ``llama.Transformer``: ``model(ids [1, T], positions [1, T], cache)``).

    ``vocab``: the target's logit width; draft logits are cut or padded (with -inf) to it. ``kv_dtype``: the
    draft cache's dtype. Greedy requests take the draft's argmax (``probs`` None); sampled ones draw from the
    draft's filtered distribution (same temperature / top-k / top-p / min-p as the request) and return it.
    """

    samples = True

    def __init__(self, model: nn.Module, vocab: int, kv_dtype: torch.dtype, weight_bytes: int = 0) -> None:
        self.model = model
        self.vocab = vocab
        self.kv_dtype = kv_dtype
        self.weight_bytes = weight_bytes
        self.cache: ContiguousKVCache | None = None
        self.fed = 0  # tokens whose keys/values are in self.cache
        self.capacity = 0  # the sequence's bound from begin(): a cache rebuilt after suspend() gets it again

    def begin(self, prompt_ids: list[int], capacity: int) -> None:
        cfg = self.model.config
        dev = model_device(self.model)
        self.model.rope_tables(dev, capacity)
        self.cache = ContiguousKVCache(
            len(self.model.layers), 1, cfg.num_kv_heads, cfg.head_dim, capacity, self.kv_dtype, dev
        )
        self.fed = 0
        self.capacity = capacity

    def _logits(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` (the tokens after ``self.fed``) and return the next-token logits ``[vocab]`` (fp32)."""
        dev = model_device(self.model)
        x = torch.tensor([ids], device=dev)
        pos = torch.arange(self.fed, self.fed + len(ids), device=dev)[None]
        out = self.model(x, pos, self.cache, "last")[0]
        self.fed += len(ids)
        v = out.shape[0]
        if v >= self.vocab:
            return out[: self.vocab]
        return torch.cat((out, out.new_full((self.vocab - v,), float("-inf"))))

    def propose(
        self, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        if self.cache is None or self.fed > len(tokens):
            self.begin(tokens, max(self.capacity, len(tokens) + k + 1) if self.capacity else len(tokens) + 256)
        assert self.cache is not None
        logits = self._logits(tokens[self.fed :])
        out: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            if params.greedy:
                tok = int(logits.argmax())
            else:
                q = filter_logits(logits, params).softmax(-1)
                q = q.cpu() if generator is not None else q
                tok = int(torch.multinomial(q, 1, generator=generator))
                probs.append(q)
            out.append(tok)
            if i < k - 1:
                logits = self._logits([tok])
        return Draft(out, torch.stack(probs) if probs else None)

    def rollback(self, valid: int) -> None:
        if self.cache is not None and self.fed > valid:
            self.fed = valid
            self.cache.truncate(valid)

    def suspend(self) -> None:
        self.cache, self.fed = None, 0  # the next propose feeds every token again

    def memory_bytes(self) -> int:
        return self.weight_bytes + (self.cache.reserved_bytes() if self.cache is not None else 0)


@PROPOSERS.register("draft")
class DraftModelProposer(ModelProposer):
    """A separate model (e.g. Qwen2.5-Coder-0.5B for the 1.5B). Build it with :func:`check_same_vocab` first."""


@PROPOSERS.register("self")
class SelfProposer(ModelProposer):
    """The target's first ``layers`` layers, then its final norm and head (shares every weight)."""


def first_layers(model: nn.Module, layers: int) -> nn.Module:
    """A shallow copy of ``model`` (a ``llama.Transformer``) that runs only its first ``layers`` blocks; every
    module is shared, so it costs no weight memory."""
    total = len(model.layers)
    if not 1 <= layers < total:
        raise SpecError(f"self: layers must be in [1, {total - 1}] for this {total}-layer model, got {layers}")
    view = copy.copy(model)
    view._modules = dict(model._modules)  # copy.copy shares the dict: replacing "layers" must not touch model
    view._modules["layers"] = nn.ModuleList(list(model.layers[:layers]))
    view._plan = None
    view._compiled = None
    return view


def check_same_vocab(target_tok: Any, draft_tok: Any, target_name: str, draft_name: str) -> None:
    """Raise :class:`SpecError` naming both vocabularies unless the draft's token ids mean the target's."""
    nt, nd = target_tok.vocab_size, draft_tok.vocab_size
    same = nt == nd
    if same:
        step = max(1, nt // 512)  # spot-check ids across the whole table, and the special tokens
        ids = [*range(0, nt, step), nt - 1]
        same = all(target_tok.id_to_token(i) == draft_tok.id_to_token(i) for i in ids)
        same = same and target_tok.eos_ids == draft_tok.eos_ids
    if not same:
        def desc(tok: Any) -> str:
            sample = ", ".join(repr(tok.id_to_token(i)) for i in (0, 1, 2, tok.vocab_size - 1))
            return f"{tok.vocab_size} tokens [{sample}], eos {sorted(tok.eos_ids)}"

        raise SpecError(
            f"draft model {draft_name} has a different vocabulary ({desc(draft_tok)}) from the target "
            f"{target_name} ({desc(target_tok)}): speculative decoding needs the same token ids; use a draft "
            "of the target's family (e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b), or --spec ngram"
        )
