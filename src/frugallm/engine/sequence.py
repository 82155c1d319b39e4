"""Per-choice state: token ids, incremental detokenization, stop conditions.

A :class:`Sequence` is also the scheduler's :class:`~frugallm.engine.scheduler.SeqState` (blocks, progress):
one object per choice, each token appended once (to ``token_ids``, prompt first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from frugallm.engine.scheduler import SeqState
from frugallm.sampling import SamplingParams
from frugallm.structured import Matcher
from frugallm.tokenizer.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    """The result of one prompt (vLLM-like field names)."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while running
    metrics: dict[str, float] = field(default_factory=dict)
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None


# Already-read tokens decoded in front of new ones after a full re-decode (vLLM uses 5 as well).
_CONTEXT_TOKENS = 5


class Sequence(SeqState):
    """One choice of a prompt being generated. Text deltas hold back what could still become a stop string.

    ``request`` and ``index`` place it in its engine request (``None`` / 0 outside the serving engine);
    ``num_emitted_tokens`` counts the tokens already handed out as step outputs.
    """

    def __init__(
        self,
        request_id: int,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        max_len: int,
        request: Any = None,
        index: int = 0,
    ) -> None:
        super().__init__(list(prompt_ids))
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokenizer = tokenizer
        self.request = request
        self.index = index
        self.num_emitted_tokens = 0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # One entry per prompt token (the first has nothing to condition on), filled as the prompt is computed.
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.text = ""
        self.emitted = 0  # chars of self.text already returned as deltas
        self.finish_reason: str | None = None
        self.max_new = min(params.max_tokens, max_len - len(prompt_ids))
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eos_ids))
        self.generator: torch.Generator | None = None
        self.matcher: Matcher | None = None  # structured output: this choice's grammar state
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.kv_cache_bytes: int | None = None
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        # Incremental detokenization state (see _detokenize): output_ids[_prefix:_read] were decoded last
        # step as context, output_ids[_read:] are new; _text is the untruncated output text so far.
        self._prefix = 0
        self._read = 0
        self._text = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_prompt_logits(self) -> bool:
        """Are prompt log-probabilities still to compute (every prompt position's logits, no cached prefix)?"""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        """The generated token ids (a copy: ``token_ids`` holds them after the prompt)."""
        return self.token_ids[self.num_prompt_tokens :]

    def append(self, token: int) -> None:
        """Add a sampled token and update text / finish state."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.token_ids.append(token)
        if token in self.stop_ids:
            self._finish("stop", now)
            return
        text = self._detokenize()
        if text is not None:
            prev = len(self.text)
            self.text = text
            for s in self.params.stop:
                i = text.find(s, max(0, prev - len(s) + 1))
                if i != -1:
                    self.text = text[:i]
                    self._finish("stop", now)
                    return
        if self.matcher is not None and self.matcher.done:  # structured output complete: nothing may follow
            self._finish("stop", now)
        elif self.num_output_tokens >= self.max_new:
            self._finish("length", now)

    def _detokenize(self) -> str | None:
        """The full output text after the newest token, or None while it ends in an incomplete character.

        Incremental (as vLLM): only the tokens from ``_prefix`` on are decoded, twice (with and without the
        unread ones), so a step costs O(window) instead of O(output); decoding a few already-read tokens in
        front keeps the decoder's handling of word boundaries (SentencePiece's leading space) the same as
        for the full sequence.
        """
        skip = self.params.skip_special_tokens
        window = self.token_ids[self.num_prompt_tokens + self._prefix :]
        read = self._read - self._prefix
        before = self.tokenizer.decode(window[:read], skip_special_tokens=skip) if read else ""
        after = self.tokenizer.decode(window, skip_special_tokens=skip)
        if after.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next byte
            return None
        if len(after) <= len(before) or not after.startswith(before):
            # Nothing new (e.g. a skipped special token), or the decoder rewrote earlier text: decode all.
            full = self.tokenizer.decode(self.output_ids, skip_special_tokens=skip)
            n = self.num_output_tokens
            self._prefix, self._read = max(0, n - _CONTEXT_TOKENS), n
            self._text = full
            return full
        self._text += after[len(before) :]
        self._prefix, self._read = self._read, self.num_output_tokens
        return self._text

    def _finish(self, reason: str, now: float) -> None:
        self.finish_reason = reason
        self.t_end = now

    def take_delta(self) -> str:
        """New text since the last call (all of it once finished)."""
        end = len(self.text) if self.finished else max(self.emitted, len(self.text) - self._hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def output(self) -> RequestOutput:
        n = self.num_output_tokens
        m: dict[str, float] = {"prompt_tokens": len(self.prompt_ids), "output_tokens": n}
        if self.kv_cache_bytes is not None:
            m["kv_cache_bytes"] = self.kv_cache_bytes
        if self.t_first is not None:
            m["ttft_s"] = self.t_first - self.t_start
        if self.t_end is not None:
            m["e2e_s"] = self.t_end - self.t_start
            if n > 1 and self.t_first is not None:
                m["tpot_s"] = (self.t_end - self.t_first) / (n - 1)
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_ids,
            self.text,
            self.output_ids,
            self.finish_reason,
            m,
            self.logprobs,
            self.prompt_logprobs,
        )
