"""Synthetic passkey retrieval (needle in a haystack), generated locally.

A prompt is: an instruction, filler text, the needle ``"The pass key is NNNNN. Remember it."`` inserted
at a sentence boundary at ``depth`` (0 = start of the filler, 1 = end), the filler's rest, and the
question; wrapped in the model's chat template when it has one, and ending with the start of the answer
(``"The pass key is"``) so that small models answer in the expected form. Prompts are assembled from
token ids piece by piece, so each is exactly ``context_len`` tokens long (the filler's last sentence is
cut to fit). The answer counts as correct when the key's digits appear in the greedy continuation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from frugallm.errors import FrugalError

NEEDLE = "The pass key is {key}. Remember it."
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
# The classic filler (Mohtashami & Jaggi, 2023): carries no information and no digits.
REPEAT_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                 "There and back again.")
_MARK = "\x00HAYSTACK\x00"
ANSWER_TOKENS = 12


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float  # requested
    actual_depth: float  # needle start within the filler, as a fraction of the filler tokens
    needle_start: int  # index in ids of the needle's first token
    needle_len: int


def _template_parts(tokenizer: Any, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack (instruction, question, answer prefix)."""
    user = f"{INTRO}\n\n{_MARK}\n\n{QUESTION}"
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
        text += ANSWER_PREFIX
    else:
        text = f"{user}\n{ANSWER_PREFIX}"
    before, after = text.split(_MARK)
    return tokenizer.encode(before, add_special_tokens=True), tokenizer.encode(after, add_special_tokens=False)


def filler_sentences(corpus_text: str | None) -> list[str]:
    """Filler units: the repeated classic sentences, or digit-free sentences of a corpus."""
    if corpus_text is None:
        return list(REPEAT_FILLER)
    parts = re.split(r"(?<=[.!?])\s+", " ".join(corpus_text.split()))
    sents = [s for s in parts if 20 <= len(s) <= 300 and not re.search(r"\d", s)]
    if len(sents) < 10:
        raise FrugalError("passkey: the corpus has too few digit-free sentences to use as filler")
    return sents


def make_prompt(tokenizer: Any, context_len: int, depth: float, key: str, *, chat: bool = True,
                sentences: Sequence[str] = REPEAT_FILLER, start: int = 0) -> PasskeyPrompt:
    """One prompt of exactly ``context_len`` tokens with the needle at ``depth`` (sentence-aligned)."""
    if not 0.0 <= depth <= 1.0:
        raise FrugalError(f"passkey: depth must be in [0, 1], got {depth}")
    head, tail = _template_parts(tokenizer, chat)
    needle = tokenizer.encode(" " + NEEDLE.format(key=key), add_special_tokens=False)
    budget = context_len - len(head) - len(tail) - len(needle)
    if budget < 1:
        raise FrugalError(f"passkey: context_len {context_len} is too short; the instruction, question and "
                          f"needle alone take {context_len - budget} tokens")
    units: list[list[int]] = []
    total, i = 0, start
    encoded: dict[int, list[int]] = {}
    while total < budget:
        j = i % len(sentences)
        if j not in encoded:
            encoded[j] = tokenizer.encode(" " + sentences[j], add_special_tokens=False)
        unit = encoded[j][: budget - total]
        units.append(unit)
        total += len(unit)
        i += 1
    bounds = [0]
    for u in units:
        bounds.append(bounds[-1] + len(u))
    cut = min(range(len(bounds)), key=lambda k: abs(bounds[k] - depth * budget))
    filler_before = [t for u in units[:cut] for t in u]
    filler_after = [t for u in units[cut:] for t in u]
    ids = head + filler_before + needle + filler_after + tail
    return PasskeyPrompt(ids, key, depth, bounds[cut] / budget, len(head) + len(filler_before), len(needle))


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FrugalError(f"--depths must be comma-separated numbers in [0, 1], got {text!r}") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise FrugalError(f"--depths must be comma-separated numbers in [0, 1], got {text!r}")
    return depths


Generate = Callable[[list[list[int]], int], list[str]]  # prompts (token ids), max new tokens -> texts


def evaluate(generate: Generate, tokenizer: Any, *, context_len: int, depths: Sequence[float], trials: int,
             seed: int = 0, chat: bool = True, corpus_text: str | None = None, max_model_len: int | None = None,
             batch_size: int = 8) -> dict[str, Any]:
    """Accuracy of greedy passkey retrieval over ``depths`` x ``trials`` (a fresh random key per trial)."""
    if trials < 1:
        raise FrugalError(f"passkey: trials must be >= 1, got {trials}")
    if max_model_len is not None and context_len + ANSWER_TOKENS > max_model_len:
        raise FrugalError(f"passkey: context {context_len} + {ANSWER_TOKENS} answer tokens exceeds the model's "
                          f"context window of {max_model_len} tokens")
    sentences = filler_sentences(corpus_text)
    rng = random.Random(seed)
    prompts = [make_prompt(tokenizer, context_len, d, str(rng.randint(10000, 99999)), chat=chat,
                           sentences=sentences, start=rng.randrange(len(sentences)))
               for d in depths for _ in range(trials)]
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        answers += generate([p.ids for p in prompts[i:i + batch_size]], ANSWER_TOKENS)
    samples = [{"depth": p.depth, "actual_depth": round(p.actual_depth, 4), "key": p.key, "answer": a,
                "correct": p.key in a} for p, a in zip(prompts, answers, strict=True)]
    per_depth = {str(d): sum(s["correct"] for s in samples if s["depth"] == d) / trials for d in depths}
    return {"task": "passkey", "context_len": context_len, "depths": list(depths), "trials": trials,
            "accuracy": sum(s["correct"] for s in samples) / len(samples), "per_depth": per_depth,
            "filler": "repeat" if corpus_text is None else "corpus", "chat_template": chat, "samples": samples}
