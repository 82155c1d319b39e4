"""Sampling parameters (vLLM names) and the logits -> token step."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from frugallm.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy.

    Penalties: ``repetition_penalty`` (CTRL/HF style, over prompt and output tokens: positive logits
    divided, negative multiplied); ``presence_penalty`` and ``frequency_penalty`` (OpenAI style, over
    output tokens). ``stop`` strings are cut from the returned text; ``stop_token_ids`` end generation
    like EOS. ``seed`` makes sampling reproducible per request.

    ``logit_bias`` (token id -> value added to its logit, clamped to [-100, 100] as OpenAI does) and
    ``min_tokens`` (EOS and ``stop_token_ids`` are masked until this many tokens were generated) shape the
    logits before sampling. ``prompt_logprobs``: this many top log-probabilities for every prompt token
    (the first has none), plus the token's own. ``json_schema`` / ``grammar``: structured output, the output
    is constrained token by token (``frugallm.structured``); ``{"type": "object"}`` is any JSON object.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # return this many top log-probabilities per output token
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); a dict is accepted
    json_schema: str | None = None  # JSON text of a schema the output must match (a dict is accepted)
    grammar: str | None = None  # a Lark grammar (llguidance's dialect) the output must match
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias or ()
        try:
            bias = tuple(sorted((int(t), max(-100.0, min(100.0, float(b)))) for t, b in bias))
        except (TypeError, ValueError):
            raise InvalidRequestError("logit_bias must map token ids to numbers") from None
        object.__setattr__(self, "logit_bias", bias)
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except ValueError as e:
                raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise InvalidRequestError("json_schema must be a JSON object (a schema)")
        if self.json_schema is not None and self.grammar is not None:
            raise InvalidRequestError("json_schema and grammar are exclusive: give one")
        checks = [
            (
                isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                f"max_tokens must be >= 1, got {self.max_tokens}",
            ),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (
                isinstance(self.top_k, int) and self.top_k >= 0,
                f"top_k must be an integer >= 0 (0 = off), got {self.top_k}",
            ),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
            ),
            (
                isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
            ),
            (all(t >= 0 for t, _ in self.logit_bias), "logit_bias token ids must be >= 0"),
            (
                self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64),
                f"seed must be an integer in [-2**63, 2**64), got {self.seed}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequestError(msg)

    @property
    def greedy(self) -> bool:
        # Temperatures this small are greedy in effect, and dividing logits by them overflows (vLLM's rule).
        return self.temperature < _GREEDY_BELOW

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def shapes_logits(self) -> bool:
        """Does anything change a row's logits before the pick (penalties, bias, ``min_tokens``)?"""
        return self.needs_history or bool(self.logit_bias) or self.min_tokens > 0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise :class:`InvalidRequestError` for token ids outside ``[0, vocab_size)``."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequestError(f"{name}: token ids out of range [0, {vocab_size}): {bad[:5]}", name)


_GREEDY_BELOW = 1e-5
_FMAX = torch.finfo(torch.float32).max


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor, output_ids: torch.Tensor
) -> torch.Tensor:
    """``logits: [vocab]`` (fp32), ids are 1-D long tensors on the same device."""
    if params.repetition_penalty != 1:
        seen = torch.cat((prompt_ids, output_ids)).unique()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_ids.numel() and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(output_ids, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits.clamp_(-_FMAX, _FMAX)  # an extreme repetition_penalty must not make inf (then NaN) logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p; disallowed tokens get ``-inf``. ``logits: [vocab]``."""
    logits = (logits / params.temperature).clamp_(-_FMAX, _FMAX)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        remove = probs.cumsum(-1) - probs >= params.top_p
        remove[0] = False  # a top_p below fp32's smallest value compares as 0 and would remove every token
        logits = logits.scatter(0, idx[remove], float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy or filtered multinomial choice from already-penalised ``logits: [vocab]`` (fp32)."""
    if params.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits, params).softmax(-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()  # seeded generators live on the CPU
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    prompt_ids: torch.Tensor | None = None,
    output_ids: torch.Tensor | None = None,
) -> int:
    """Pick one token from ``logits: [vocab]`` (fp32), applying penalties over the given history."""
    if params.needs_history:
        assert prompt_ids is not None and output_ids is not None
        logits = apply_penalties(logits.clone(), params, prompt_ids, output_ids)
    return pick_token(logits, params, generator)


def shape_logits(row: torch.Tensor, seq: Any) -> torch.Tensor:
    """Penalties, ``logit_bias`` and ``min_tokens`` applied in place to ``row: [vocab]`` (fp32) of ``seq``.

    ``seq`` has ``params``, ``prompt_ids``, ``output_ids`` and ``stop_ids`` (the ids that end it: EOS and
    ``stop_token_ids``), as :class:`frugallm.engine.sequence.Sequence`.
    """
    p = seq.params
    if p.needs_history:
        dev = row.device
        row = apply_penalties(row, p, torch.tensor(seq.prompt_ids, dtype=torch.long, device=dev),
                              torch.tensor(seq.output_ids, dtype=torch.long, device=dev))
    if p.logit_bias:
        ids, vals = zip(*p.logit_bias, strict=True)
        row[torch.tensor(ids, device=row.device)] += torch.tensor(vals, dtype=row.dtype, device=row.device)
    if p.min_tokens and len(seq.output_ids) < p.min_tokens and seq.stop_ids:
        row[torch.tensor(sorted(seq.stop_ids), device=row.device)] = float("-inf")
    return row


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[dict[int, float]]:
    """Log-probabilities of ``targets: [T]`` under ``logits: [T, vocab]`` (fp32; row ``t`` predicts
    ``targets[t]``): per position the ``k`` most likely ids and the target's own."""
    lp = logits.float().log_softmax(-1)
    own = lp.gather(1, targets[:, None])[:, 0].tolist()
    out = []
    if k:
        top = lp.topk(k, dim=-1)
        for t, (idx, val) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True)):
            entry = dict(zip(idx, val, strict=True))
            entry[int(targets[t])] = own[t]
            out.append(entry)
    else:
        out = [{int(tid): v} for tid, v in zip(targets.tolist(), own, strict=True)]
    return out


def sample_batch(logits: torch.Tensor, seqs: Sequence[Any]) -> list[int]:
    """One token per row of ``logits [S, vocab]`` (fp32) for ``seqs`` (penalties, filters, logprobs).

    ``seqs`` are :class:`frugallm.engine.sequence.Sequence` objects (``params``, ``prompt_ids``,
    ``output_ids``, ``stop_ids``, ``generator``, ``logprobs``, ``finished``); ``LLM`` and the serving engine
    share this. Penalties apply over the prompt/output history, then ``logit_bias`` and ``min_tokens``
    (:func:`shape_logits`), then greedy or temperature / top-k / top-p / min-p
    sampling with the sequence's own generator; log-probabilities are those of the penalised
    distribution before temperature.
    """
    if all(s.params.greedy and not s.params.shapes_logits and s.logprobs is None for s in seqs):
        return logits.argmax(-1).tolist()
    out = []
    for row, s in zip(logits, seqs, strict=True):
        if s.params.shapes_logits:
            row = shape_logits(row.clone(), s)
        tok = pick_token(row, s.params, s.generator)
        if s.logprobs is not None and not s.finished:  # static batches keep finished rows
            lp = row.log_softmax(-1)
            top = lp.topk(max(s.params.logprobs or 0, 1))
            entry = {int(k): float(v) for k, v in zip(top.indices, top.values, strict=True)}
            entry[tok] = float(lp[tok])
            s.logprobs.append(entry)
        out.append(tok)
    return out
