"""``SpecDecoder``: the speculative decode loop for one sequence on a truncatable KV cache.

Each round: the controller picks ``k`` (``adaptive.py``); the proposer drafts up to ``k`` tokens; the target
runs the last committed token and the drafts as ``k + 1`` rows in one pass; ``verify.py`` decides what is kept;
the target's cache and the proposer drop what belongs to rejected drafts. ``k == 0`` or an empty draft is a
plain one-row step, the non-speculative path itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from frugallm.spec.adaptive import PROBE_K, AdaptiveK
from frugallm.spec.config import SpecConfig
from frugallm.spec.proposer import Proposer
from frugallm.spec.stats import SpecStats
from frugallm.spec.verify import greedy_accept, rejection_accept, target_probs


class TruncatableCache(Protocol):
    def truncate(self, length: int) -> None: ...


def supports(params: Any) -> bool:
    """Requests speculation serves exactly: penalties and logprobs need per-row history (not yet done here)."""
    return not params.needs_history and params.logprobs is None


class _Shadow:
    """A free proposer's guess made while speculation is off, checked against the plain steps' tokens one by one;
    once it misses or is used up, what a verify pass would have kept goes to the controller (``observe_shadow``)."""

    def __init__(self, ctrl: AdaptiveK) -> None:
        self.ctrl = ctrl
        self.tokens: list[int] = []
        self.hits = 0

    @property
    def pending(self) -> bool:
        return bool(self.tokens)

    def start(self, tokens: list[int]) -> None:
        self.tokens, self.hits = tokens, 0

    def drop(self) -> None:
        self.tokens = []

    def check(self, token: int) -> int:
        """The plain step produced ``token``; 1 when this resolved the guess (a shadow round), else 0."""
        if token == self.tokens[self.hits]:
            self.hits += 1
            if self.hits < len(self.tokens):
                return 0
        self.ctrl.observe_shadow(len(self.tokens), self.hits)
        self.tokens = []
        return 1


class SpecDecoder:
    """Drives ``model`` (``model(ids [1, T], positions [1, T], cache, "last" | "all") -> fp32 logits``) for one
    ``seq`` (an ``engine.Sequence``: ``token_ids``, ``params``, ``generator``, ``append``, ``finished``)."""

    def __init__(self, cfg: SpecConfig, proposer: Proposer, stats: SpecStats | None = None,
                 gate: Callable[[], bool] | None = None) -> None:
        """``gate``: asked before every round; False makes it a plain step (a server above its speculation
        threshold, see ``engine/spec_solo.py``) without touching the adaptive controller's probes; the proposer is
        suspended (its draft cache freed) when the gate turns speculation off, rebuilt when it turns it on."""
        self.cfg = cfg
        self.proposer = proposer
        self.stats = stats if stats is not None else SpecStats()
        self.gate = gate

    def run(
        self,
        model: Callable[..., torch.Tensor],
        cache: TruncatableCache,
        seq: Any,
        device: torch.device,
        sample_first: Callable[[], None],
    ) -> Iterator[None]:
        """Decode ``seq`` to its end after the prefill (its logits sampled by ``sample_first``); yields after
        every round. The cache holds every committed token but the last when this starts and after each round."""
        ctrl = AdaptiveK(self.cfg.k, self.cfg.adaptive)
        params, gen = seq.params, seq.generator
        sample_first()
        yield
        suspended = False
        shadow = _Shadow(ctrl) if self.proposer.free and self.cfg.adaptive else None
        while not seq.finished:
            n_done = len(seq.token_ids) - 1  # tokens whose keys/values the target's cache holds
            last = seq.token_ids[-1]
            gated = self.gate is not None and not self.gate()
            if gated != suspended:
                suspended = gated
                if gated:
                    self.proposer.suspend()
            k = 0 if gated else min(ctrl.next_k(), seq.max_new - seq.num_output_tokens - 1)  # drafts + target's
            t0 = time.perf_counter()
            draft = self.proposer.propose(seq.token_ids, k, params, gen) if k > 0 else None
            if shadow is not None:
                if k > 0 or gated:
                    shadow.drop()  # speculating again (or gated): a pending guess is moot
                elif not shadow.pending:
                    shadow.start(self.proposer.propose(seq.token_ids, min(self.cfg.k, PROBE_K), params, gen).tokens)
            t1 = time.perf_counter()
            if draft is None or not draft.tokens:
                if draft is not None:
                    ctrl.observe_empty()
                logits = model(torch.tensor([[last]], device=device), torch.tensor([[n_done]], device=device),
                               cache, "last")
                tok = greedy_accept(logits, [])[1] if params.greedy else rejection_accept(
                    target_probs(logits, params), None, [], gen)[1]
                dt = time.perf_counter() - t1
                ctrl.observe_plain(dt)
                self.stats.plain_steps += 1
                self.stats.plain_s += dt + (t1 - t0)
                seq.append(tok)
                self.proposer.rollback(n_done)
                if shadow is not None and shadow.pending:
                    self.stats.shadow_rounds += shadow.check(tok)
                yield
                continue
            drafts = draft.tokens
            ids = torch.tensor([[last, *drafts]], device=device)
            pos = torch.arange(n_done, n_done + len(drafts) + 1, device=device)[None]
            logits = model(ids, pos, cache, "all")[0]  # [k + 1, vocab]
            if params.greedy:
                kept, tok = greedy_accept(logits, drafts)
            else:
                kept, tok = rejection_accept(target_probs(logits, params), draft.probs, drafts, gen)
            cache.truncate(n_done + 1 + kept)  # drop the keys/values of rejected drafts
            t2 = time.perf_counter()
            emitted = 0
            for t in (*drafts[:kept], tok):
                seq.append(t)
                emitted += 1
                if seq.finished:
                    break
            self.proposer.rollback(len(seq.token_ids) - 1)
            ctrl.observe_round(len(drafts), kept, t1 - t0, t2 - t1)
            self.stats.record_round(len(drafts), kept, t1 - t0, t2 - t1, emitted)
            yield
