"""Runs a scheduled batch through the model on the paged cache, and samples.

Batching choice: a step makes at most a few forward passes.

* every decode (one new token) in one ``[B, 1]`` pass: the weights are read once for all sequences,
  which is where batching pays on a memory-bound CPU or GPU;
* prefill chunks right-padded into ``[P, T]`` passes, grouped by length so that padding stays under
  a quarter of the tokens (equal-length prompts, the common benchmark case, share one pass).

Prefill is kept apart from decodes because padding a ``[B, 1]`` decode to a long chunk's length would
multiply its cost by that length.
"""

from __future__ import annotations

import contextlib

import torch

from frugallm.engine.block_manager import ring_slot
from frugallm.engine.paged_cache import PagedKVCache
from frugallm.engine.scheduler import SchedulerOutput, SeqState
from frugallm.kv.speckv import lookahead_pass
from frugallm.lora.manager import LoraManager
from frugallm.model.llama import Transformer

_MAX_PAD_FRACTION = 0.25


def group_prefills(lengths: list[int]) -> list[list[int]]:
    """Indices of prefill chunks grouped so that each group's padding is <= 25% of its tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1]
            longest = lengths[g[0]]
            real = sum(lengths[j] for j in g) + lengths[i]
            if longest * (len(g) + 1) - real <= _MAX_PAD_FRACTION * real:
                g.append(i)
                continue
        groups.append([i])
    return groups


class ModelRunner:
    """Owns the paged cache; :meth:`run` returns the last-token logits of sequences that sample."""

    def __init__(self, model: Transformer, cache: PagedKVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.lora: LoraManager | None = None  # binds each pass's rows to their LoRA adapters
        # Set by each run: {index into out.seqs: fp32 logits [num_new, vocab]} of every computed position, for
        # sequences that asked for prompt log-probabilities (``needs_prompt_logits``).
        self.all_logits: dict[int, torch.Tensor] = {}
        # Set by each run: {index into out.seqs: per layer, the slots its KV policy keeps [kv_heads, keep]} of
        # sequences whose prompt ended this step (the engine compacts their blocks).
        self.kept: dict[int, list[torch.Tensor]] = {}
        self.kept_stats: dict[int, list[dict[str, torch.Tensor]]] = {}  # their policies' per-slot statistics
        # A pass of one sequence (a decode, or a prompt from its first token) reads its blocks in place
        # (PagedKVCache.bind_run) when they are consecutive in the pool; False: bind()'s gather, as any batch.
        self.in_place_decode = True
        self.num_in_place = 0  # passes that did

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> tuple[list[int], torch.Tensor | None]:
        """Compute ``out``'s tokens. Returns (indices into ``out.seqs`` that sample, fp32 logits [S, vocab])."""
        self.cache.copy_blocks(out.copies)
        decodes = [i for i, n in enumerate(out.num_new) if n == 1]
        prefills = [i for i, n in enumerate(out.num_new) if n > 1]
        # SpecKV: a prompt's last chunk, followed by the draft's lookahead tokens, runs alone (no other row has them).
        alone = [i for i in prefills if getattr(out.seqs[i].kv_policy, "needs_draft", False)
                 and out.seqs[i].num_computed_tokens + out.num_new[i] >= out.seqs[i].num_prompt_tokens]
        prefills = [i for i in prefills if i not in alone]
        groups = ([decodes] if decodes else []) + [
            [prefills[j] for j in g] for g in group_prefills([out.num_new[i] for i in prefills])
        ] + [[i] for i in alone]
        rows: list[int] = []
        logits: list[torch.Tensor] = []
        self.all_logits = {}
        self.kept, self.kept_stats = {}, {}
        for g in groups:
            sampled = [i for i in g if out.samples(i)]
            want_all = [i for i in g if out.seqs[i].needs_prompt_logits]
            lg = self._forward(out, g, bool(want_all))
            if want_all:  # [P, T, vocab]: keep the wanted rows' positions, then each row's last token
                for i in want_all:
                    self.all_logits[i] = lg[g.index(i), : out.num_new[i]]
                last = torch.tensor([out.num_new[i] - 1 for i in g], device=lg.device)
                lg = lg[torch.arange(len(g), device=lg.device), last]
            if sampled:
                keep = [g.index(i) for i in sampled]
                logits.append(lg if len(keep) == len(g) else lg[torch.tensor(keep, device=lg.device)])
                rows += sampled
        return rows, (torch.cat(logits) if len(logits) > 1 else logits[0]) if logits else None

    def _forward(self, out: SchedulerOutput, idx: list[int], all_positions: bool = False) -> torch.Tensor:
        if len(idx) == 1 and not all_positions:
            s, n = out.seqs[idx[0]], out.num_new[idx[0]]
            # One sequence decoding or starting its prompt, no KV policy or KIVI: its blocks read in place (bind_run).
            if (self.in_place_decode and s.kv_policy is None and s.kv_quant is None and not s.num_evicted
                    and self.cache.bind_run(s.block_table, s.num_computed_tokens, n)):
                self.num_in_place += 1
                return self._forward_in_place(s, n)
        seqs = [out.seqs[i] for i in idx]
        num_new = [out.num_new[i] for i in idx]
        starts = [s.num_computed_tokens for s in seqs]  # RoPE positions; slots are these less the evicted
        t = max(num_new)
        ids = torch.zeros(len(seqs), t, dtype=torch.long)
        pos = torch.zeros(len(seqs), t, dtype=torch.long)
        for r, (s, st, n) in enumerate(zip(seqs, starts, num_new, strict=True)):
            ids[r, :n] = torch.tensor(s.token_ids[st:st + n])
            pos[r, :n] = torch.arange(st, st + n)
            pos[r, n:] = st + n - 1  # padding: any valid position
        # Rows whose pass ends the prompt run their KV policy (the scheduler stops such a pass there).
        evict = {r: s.kv_policy for r, (s, st, n) in enumerate(zip(seqs, starts, num_new, strict=True))
                 if s.kv_policy is not None and st < s.num_prompt_tokens <= st + n}
        overwrite = {r: slot for r, s in enumerate(seqs) if (slot := ring_slot(s)) is not None}
        # Generated tokens of sequences whose policy scores its slots at every step (H2O; compacted at prefill).
        scored = {r: (s.kv_policy, s.max_slots - 1, s.kv_stats)
                  for r, (s, st) in enumerate(zip(seqs, starts, strict=True))
                  if s.kv_stats is not None and s.kv_policy is not None and st >= s.num_prompt_tokens}
        packed = {r: (s.kv_quant, s.packed_table) for r, s in enumerate(seqs) if s.packed_table}  # KIVI chunks
        self.cache.bind([s.block_table for s in seqs], [st - s.num_evicted for s, st in zip(seqs, starts, strict=True)],
                        num_new, evict, overwrite, scored, packed)
        last = "last" if t == 1 or len(set(num_new)) == 1 else torch.tensor(num_new, device=self.device) - 1
        if all_positions:
            last = "all"
        ids, pos, cache = ids.to(self.device), pos.to(self.device), self.cache
        look = None
        if len(seqs) == 1 and 0 in evict:  # SpecKV: the prompt's last chunk, then the draft's lookahead tokens
            s = seqs[0]
            look = lookahead_pass(evict[0], self.model, ids, pos, cache, prompt=s.token_ids[:s.num_prompt_tokens])
        if look is not None:
            ids, pos, cache = look
            t = ids.shape[1]
            last = "all" if all_positions else torch.tensor([num_new[0] - 1], device=self.device)
        bound = contextlib.nullcontext() if self.lora is None else self.lora.bound([s.lora for s in seqs], t)
        with bound:
            logits = self.model(ids, pos, cache, last)
        self.kept.update({idx[r]: kept for r, kept in self.cache.kept.items()})
        self.kept_stats.update({idx[r]: stats for r, stats in self.cache.kept_stats.items()})
        return logits

    def _forward_in_place(self, s: SeqState, n: int) -> torch.Tensor:
        """The pass of one sequence bound by ``PagedKVCache.bind_run`` (its next ``n`` tokens): fp32 logits
        ``[1, vocab]`` of the last."""
        st = s.num_computed_tokens
        inp = torch.tensor([s.token_ids[st:st + n], range(st, st + n)], device=self.device)  # [2, n]: tokens, positions
        bound = contextlib.nullcontext() if self.lora is None else self.lora.bound([s.lora], n)
        with bound:
            return self.model(inp[:1], inp[1:], self.cache, "last")
