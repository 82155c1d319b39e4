"""Synthetic passkey retrieval (needle in a haystack), generated locally.

A prompt is: an instruction, filler text, the needle ``"The pass key is NNNNN. Remember it."`` inserted
at a sentence boundary at ``depth`` (0 = start of the filler, 1 = end), the filler's rest, and the
question; wrapped in the model's chat template when it has one, and ending with the start of the answer
(``"The pass key is"``) so that small models answer in the expected form. Prompts are assembled from
token ids piece by piece, so each is exactly ``context_len`` tokens long (the filler's last sentence is
cut to fit). The answer counts as correct when the key's digits appear in the greedy continuation.

A claim about retrieval needs many needles in more than one kind of text: :data:`HAYSTACKS` names the filler
kinds (``repeat``: the classic repeated sentences; ``prose``: CPython's pydoc topics; ``code``: lines of the
standard library's sources; ``list``: an inventory of one item per line), all digit-free so the key is the
only number, and results are counted (``19/20``) per haystack and per depth as well as overall.
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


# Standard-library modules whose sources make the ``code`` haystack (pure Python, present in every CPython).
CODE_MODULES = ("textwrap", "string", "shlex", "fnmatch", "difflib", "argparse", "dataclasses", "enum",
                "functools", "json.decoder", "json.encoder", "csv", "configparser", "calendar", "tokenize")
_LIST_WORDS = re.compile(r"^[a-z]{4,12}$")


@dataclass(frozen=True)
class Haystack:
    """Filler units (sentences, source lines, list items) and the separator put before each one."""

    name: str
    units: tuple[str, ...]
    sep: str = " "


def _code_lines() -> list[str]:
    import importlib
    import inspect

    lines: list[str] = []
    for name in CODE_MODULES:
        try:
            src = inspect.getsource(importlib.import_module(name))
        except (ImportError, OSError, TypeError):  # a stripped or frozen stdlib: fewer modules
            continue
        lines += [ln.rstrip() for ln in src.splitlines() if ln.strip() and not re.search(r"\d", ln)
                  and len(ln) <= 100 and "pass key" not in ln.lower()]
    if len(lines) < 100:
        raise FrugalError("passkey: this Python has too few standard-library sources for the code haystack")
    return lines


def _list_items(corpus_text: str) -> list[str]:
    words = sorted({w for w in re.findall(r"[a-z]+", corpus_text.lower()) if _LIST_WORDS.match(w)})
    rng = random.Random(0)
    rng.shuffle(words)
    # "- item: a b c": inventory-like lines of three words each (no digits: the key stays the only number)
    return [f"- {a}: {b}, {c}" for a, b, c in zip(words[0::3], words[1::3], words[2::3], strict=False)]


HAYSTACKS = ("repeat", "prose", "code", "list")


def haystack(name: str, corpus_text: str | None = None) -> Haystack:
    """The filler of kind ``name`` (see :data:`HAYSTACKS`); ``prose`` / ``list`` use ``corpus_text`` (default:
    the built-in corpus)."""
    if name == "repeat":
        return Haystack(name, REPEAT_FILLER)
    if name in ("prose", "list"):
        if corpus_text is None:
            from frugallm.corpus import builtin_corpus

            corpus_text = builtin_corpus()
        if name == "prose":
            return Haystack(name, tuple(filler_sentences(corpus_text)))
        return Haystack(name, tuple(_list_items(corpus_text)), "\n")
    if name == "code":
        return Haystack(name, tuple(_code_lines()), "\n")
    raise FrugalError(f"passkey: unknown haystack {name!r}; choices: {', '.join(HAYSTACKS)}")


def parse_haystacks(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in HAYSTACKS]
    if not names or bad:
        raise FrugalError(f"--haystacks must be comma-separated names from {', '.join(HAYSTACKS)}, got {text!r}")
    return names


def make_prompt(tokenizer: Any, context_len: int, depth: float, key: str, *, chat: bool = True,
                sentences: Sequence[str] = REPEAT_FILLER, start: int = 0, sep: str = " ") -> PasskeyPrompt:
    """One prompt of exactly ``context_len`` tokens with the needle at ``depth`` (unit-aligned); ``sep``
    goes before each filler unit and the needle (a space for sentences, a newline for lines)."""
    if not 0.0 <= depth <= 1.0:
        raise FrugalError(f"passkey: depth must be in [0, 1], got {depth}")
    head, tail = _template_parts(tokenizer, chat)
    needle = tokenizer.encode(sep + NEEDLE.format(key=key), add_special_tokens=False)
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
            encoded[j] = tokenizer.encode(sep + sentences[j], add_special_tokens=False)
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


def count(correct: int, total: int) -> str:
    """``"19/20 (95%)"``: a retrieval figure always carries how many needles it rests on."""
    return f"{correct}/{total} ({correct / total:.0%})" if total else "0/0"


def evaluate(generate: Generate, tokenizer: Any, *, context_len: int, depths: Sequence[float], trials: int,
             seed: int = 0, chat: bool = True, corpus_text: str | None = None, max_model_len: int | None = None,
             batch_size: int = 8, haystacks: Sequence[str] | None = None) -> dict[str, Any]:
    """Greedy passkey retrieval over ``haystacks`` x ``depths`` x ``trials`` needles (a fresh random key and
    filler offset for each).

    ``haystacks`` None keeps the single filler of before: the repeated sentences, or ``corpus_text``'s
    sentences when given. Returns ``correct`` / ``needles`` counts, ``accuracy``, ``per_depth`` and
    ``per_haystack`` accuracies and ``counts`` (``"19/20 (95%)"`` per haystack, per depth and ``all``).
    """
    if trials < 1:
        raise FrugalError(f"passkey: trials must be >= 1, got {trials}")
    if max_model_len is not None and context_len + ANSWER_TOKENS > max_model_len:
        raise FrugalError(f"passkey: context {context_len} + {ANSWER_TOKENS} answer tokens exceeds the model's "
                          f"context window of {max_model_len} tokens")
    if haystacks is None:
        stacks = [Haystack("repeat" if corpus_text is None else "corpus", tuple(filler_sentences(corpus_text)))]
    else:
        stacks = [haystack(h, corpus_text) for h in haystacks]
    rng = random.Random(seed)
    prompts = [(h.name, make_prompt(tokenizer, context_len, d, str(rng.randint(10000, 99999)), chat=chat,
                                    sentences=h.units, start=rng.randrange(len(h.units)), sep=h.sep))
               for h in stacks for d in depths for _ in range(trials)]
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        answers += generate([p.ids for _, p in prompts[i:i + batch_size]], ANSWER_TOKENS)
    samples = [{"haystack": h, "depth": p.depth, "actual_depth": round(p.actual_depth, 4), "key": p.key,
                "answer": a, "correct": p.key in a} for (h, p), a in zip(prompts, answers, strict=True)]

    def tally(group: list[dict[str, Any]]) -> tuple[int, int]:
        return sum(s["correct"] for s in group), len(group)

    by_depth = {str(d): tally([s for s in samples if s["depth"] == d]) for d in depths}
    by_stack = {h.name: tally([s for s in samples if s["haystack"] == h.name]) for h in stacks}
    good, total = tally(samples)
    return {"task": "passkey", "context_len": context_len, "depths": list(depths), "trials": trials,
            "haystacks": [h.name for h in stacks], "correct": good, "needles": total, "accuracy": good / total,
            "per_depth": {k: c / n for k, (c, n) in by_depth.items()},
            "per_haystack": {k: c / n for k, (c, n) in by_stack.items()},
            "counts": {"all": count(good, total), **{f"depth {k}": count(*v) for k, v in by_depth.items()},
                       **{k: count(*v) for k, v in by_stack.items()}},
            "filler": stacks[0].name if len(stacks) == 1 else "+".join(h.name for h in stacks),
            "chat_template": chat, "samples": samples}
