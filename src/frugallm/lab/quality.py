"""Quality next to speed: perplexity on a corpus, and KL / top-1 agreement against the unmodified model.

Windows are non-overlapping slices of the tokenized corpus, scored independently (each starts from an
empty context, so its first token has no prediction): a window of ``n`` tokens contributes ``n - 1``
next-token predictions. Perplexity = exp(mean NLL over all predictions).

The reference is the same model in float32 with no quantization or KV policy (frugallm backend). Its
log-probabilities are computed once per (model, device, tokens) and kept in a small in-process cache,
so a sweep over many configurations of one model pays for it once.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from frugallm.errors import FrugalError

DEFAULT_WINDOWS = 4
DEFAULT_WINDOW_LEN = 256

Scorer = Callable[[list[int]], torch.Tensor]  # token ids [n] -> logits [n, vocab]

_token_cache: OrderedDict[tuple[int, str, int], list[int]] = OrderedDict()
_reference_cache: OrderedDict[tuple[str, ...], list[torch.Tensor]] = OrderedDict()
REFERENCE_CACHE_SIZE = 2  # entries of [windows x window_len x vocab] fp32: keep few


def corpus_ids(tokenizer: Any, text: str, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` token ids of ``text`` (only as much text as needed is tokenized).

    Raises :class:`FrugalError` when the whole text has fewer tokens.
    """
    key = (id(tokenizer), hashlib.sha1(text.encode("utf-8", "replace")).hexdigest(), n_tokens)
    if key in _token_cache:
        return _token_cache[key]
    chars = max(4096, n_tokens * 6)
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if chars < len(text):
            ids = ids[:-1]  # the cut may have split a word that continues in the text
        if len(ids) >= n_tokens:
            break
        if chars >= len(text):
            raise FrugalError(f"the corpus has only {len(ids)} tokens; {n_tokens} are needed")
        chars *= 2
    out = ids[:n_tokens]
    _token_cache[key] = out
    while len(_token_cache) > 8:
        _token_cache.popitem(last=False)
    return out


def corpus_windows(tokenizer: Any, text: str, windows: int = DEFAULT_WINDOWS,
                   window_len: int = DEFAULT_WINDOW_LEN) -> list[list[int]]:
    """``windows`` consecutive non-overlapping windows of ``window_len`` tokens from the corpus start."""
    if windows < 1 or window_len < 2:
        raise FrugalError(f"quality: need windows >= 1 and window_len >= 2, got {windows} x {window_len}")
    ids = corpus_ids(tokenizer, text, windows * window_len)
    return [ids[i * window_len:(i + 1) * window_len] for i in range(windows)]


def window_logprobs(score: Scorer, windows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Log-softmax of each window's logits, ``[window_len - 1, vocab]`` (fp32, CPU): prediction ``i``
    is the distribution of token ``i + 1``."""
    out = []
    for w in windows:
        logits = score(list(w))[:-1].float().cpu()
        out.append(torch.log_softmax(logits, dim=-1))
    return out


def perplexity(logprobs: Sequence[torch.Tensor], windows: Sequence[Sequence[int]]) -> tuple[float, float, int]:
    """``(perplexity, mean NLL, predictions)`` of the windows' next tokens."""
    total, count = 0.0, 0
    for lp, w in zip(logprobs, windows, strict=True):
        target = torch.tensor(list(w[1:]), dtype=torch.long)
        total -= float(lp.gather(1, target[:, None]).sum())
        count += len(target)
    nll = total / count
    return math.exp(nll), nll, count


def compare(logprobs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> tuple[float, float]:
    """``(KL(reference || model) mean over positions in nats, top-1 agreement)``."""
    kl_sum, agree, n = 0.0, 0, 0
    for lp, ref in zip(logprobs, reference, strict=True):
        if lp.shape != ref.shape:
            raise FrugalError(f"quality: logits shape {tuple(lp.shape)} differs from the reference {tuple(ref.shape)}")
        kl = (ref.exp() * (ref - lp)).sum(-1)
        kl_sum += float(kl.clamp_min(0).sum())  # rounding can make a position's KL a hair below 0
        agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
        n += lp.shape[0]
    return kl_sum / n, agree / n


def _tokens_digest(windows: Sequence[Sequence[int]]) -> str:
    return hashlib.sha1(repr([list(w) for w in windows]).encode()).hexdigest()


def reference_logprobs(model_key: str, windows: Sequence[Sequence[int]],
                       make_scorer: Callable[[], Scorer]) -> list[torch.Tensor]:
    """Cached log-probs of the unmodified model; ``make_scorer`` loads it only on a cache miss."""
    key = (model_key, _tokens_digest(windows))
    if key in _reference_cache:
        _reference_cache.move_to_end(key)
        return _reference_cache[key]
    lp = window_logprobs(make_scorer(), windows)
    remember_reference(model_key, windows, lp)
    return lp


def remember_reference(model_key: str, windows: Sequence[Sequence[int]], logprobs: list[torch.Tensor]) -> None:
    """Store log-probs computed elsewhere (a run that *is* the reference configuration)."""
    _reference_cache[(model_key, _tokens_digest(windows))] = logprobs
    while len(_reference_cache) > REFERENCE_CACHE_SIZE:
        _reference_cache.popitem(last=False)


def frugal_reference_scorer(model: str, device: str = "auto", threads: int | None = None) -> Callable[[], Scorer]:
    """A loader of the reference: frugallm, float32, no quant / KV options."""

    def make() -> Scorer:
        from frugallm import LLM

        llm = LLM(model, dtype="float32", device=device, threads=threads)
        return llm.score

    return make


@dataclass(frozen=True)
class QualityResult:
    perplexity: float
    nll: float
    kl_divergence: float | None  # None when no reference could be computed
    top1_agreement: float | None
    predictions: int
    windows: int
    window_len: int
    corpus: str
    reference: str  # what the KL / agreement compare against

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(score: Scorer, tokenizer: Any, *, model_key: str, make_reference: Callable[[], Scorer] | None,
             is_reference: bool = False, corpus_text: str | None = None, corpus_name: str = "builtin",
             windows: int = DEFAULT_WINDOWS, window_len: int = DEFAULT_WINDOW_LEN) -> QualityResult:
    """Perplexity of ``score`` on the corpus and its KL / agreement against the reference model.

    ``is_reference``: this scorer *is* the unmodified float32 model, so its log-probs become the cached
    reference (KL is then exactly 0). ``make_reference`` None skips KL / agreement.
    """
    if corpus_text is None:
        from frugallm.corpus import builtin_corpus

        corpus_text = builtin_corpus()
    wins = corpus_windows(tokenizer, corpus_text, windows, window_len)
    lp = window_logprobs(score, wins)
    ppl, nll, count = perplexity(lp, wins)
    kl = agree = None
    if is_reference:
        remember_reference(model_key, wins, lp)
    if is_reference or make_reference is not None:
        ref = reference_logprobs(model_key, wins, make_reference or (lambda: score))
        kl, agree = compare(lp, ref)
    return QualityResult(ppl, nll, kl, agree, count, windows, window_len, corpus_name,
                         f"{model_key} (frugallm, float32, no quant/kv)")
