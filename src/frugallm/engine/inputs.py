"""Requests validated once: a prompt (text or token ids) and its sampling parameters become an
:class:`EngineRequest` here, before they reach any engine loop (vLLM v1's input processor).

Everything a user can get wrong about a request is checked in :meth:`InputProcessor.process`: empty prompts,
token ids outside the vocabulary, prompts that leave no room for one generated token, ``n`` outside
``[1, max_num_seqs]``. The engine loops (``LLM``, ``LLMEngine``, ``AsyncLLM``'s thread) trust an
``EngineRequest`` and never validate it again. Safe to call from any thread (no engine state is touched).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from frugallm.errors import InvalidRequestError
from frugallm.sampling import SamplingParams
from frugallm.structured import Matcher, backend_for, constraint_of
from frugallm.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineRequest:
    """A validated request: ``n`` choices sampled from one tokenized prompt."""

    request_id: str
    prompt: str | None  # the text, when the prompt was given as text
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    arrival_time: float = field(default_factory=time.perf_counter)
    matcher: Matcher | None = None  # structured output: the compiled constraint at its start (one per prompt)
    lora: Any = None  # the LoRA adapter (lora.LoraRequest) it runs with, resolved by LLMEngine.resolve_lora


class InputProcessor:
    """Tokenizes and validates prompts for a model with ``vocab_size`` ids and a ``max_model_len`` context."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, max_n: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_n = max_n  # the engine's max_num_seqs: a request's choices must fit one batch

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        """Token ids of a prompt (text is tokenized with the model's special tokens); ids are range-checked."""
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                msg = f"prompt is not valid Unicode: lone surrogate at character {e.start}"
                raise InvalidRequestError(msg) from None
            ids = self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        else:
            ids = [int(i) for i in prompt]
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if not ids:
            raise InvalidRequestError("prompt is empty")
        return ids

    def check(self, prompt_ids: Seq[int], n: int = 1, params: SamplingParams | None = None) -> None:
        """Raise :class:`InvalidRequestError` if a prompt of these ids with ``n`` choices (and ``params``'
        token ids) can never run."""
        if params is not None:
            params.check_vocab(self.vocab_size)
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt is {len(prompt_ids)} tokens but the context window is {self.max_model_len} tokens "
                "(the prompt plus at least one generated token must fit)"
            )
        if self.max_n is not None and not 1 <= n <= self.max_n:
            raise InvalidRequestError(f"n must be in [1, {self.max_n}] (max_num_seqs), got {n}")

    def compile(self, params: SamplingParams) -> Matcher | None:
        """The constraint ``params`` ask for (``json_schema`` / ``grammar``) compiled, or None; a constraint the
        library rejects raises :class:`InvalidRequestError` naming why."""
        constraint = constraint_of(params)
        if constraint is None:
            return None
        return backend_for(self.tokenizer, self.vocab_size).compile(*constraint)

    def process(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str = "",
        n: int = 1,
        arrival_time: float | None = None,
    ) -> EngineRequest:
        """The validated request for ``prompt`` (text or token ids)."""
        ids = self.encode(prompt)
        self.check(ids, n, params)
        return EngineRequest(
            request_id,
            prompt if isinstance(prompt, str) else None,
            ids,
            params or SamplingParams(),
            n,
            time.perf_counter() if arrival_time is None else arrival_time,
            self.compile(params) if params is not None else None,
        )
