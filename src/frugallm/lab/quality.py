"""Quality next to speed: perplexity on a corpus, and KL / top-1 agreement against the unmodified model.

Windows are non-overlapping slices of the tokenized corpus, scored independently (each starts from an
empty context, so its first token has no prediction): a window of ``n`` tokens contributes ``n - 1``
next-token predictions. Perplexity = exp(mean NLL over all predictions).

A KV policy only acts on the generation path (it compresses the cache after prefill and during decode), so a
one-pass teacher-forced score never runs it. With a policy, :func:`decode_scorer` makes each window's logits
the way generation would: the first ``decode_from`` share of the window is prefilled through the policy's
cache, and every later token is one teacher-forced decode step on that cache (``path`` records which).

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
DEFAULT_DECODE_FROM = 0.5  # share of a window prefilled before teacher-forced decode steps (KV policies)
PREFILL_PATH = "prefill"  # QualityResult.path: one teacher-forced pass over each window

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


def compare(logprobs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], start: int = 0) -> tuple[float, float]:
    """``(KL(reference || model) mean over positions in nats, top-1 agreement)`` over predictions ``start:``."""
    kl_sum, agree, n = 0.0, 0, 0
    for lp, ref in zip(logprobs, reference, strict=True):
        if lp.shape != ref.shape:
            raise FrugalError(f"quality: logits shape {tuple(lp.shape)} differs from the reference {tuple(ref.shape)}")
        lp, ref = lp[start:], ref[start:]
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


def decode_split(window_len: int, decode_from: float = DEFAULT_DECODE_FROM) -> int:
    """Tokens of a window prefilled before the teacher-forced decode steps (at least 1, at most ``n - 1``)."""
    if not 0.0 < decode_from < 1.0:
        raise FrugalError(f"quality: decode_from must be in (0, 1), got {decode_from}")
    return min(max(1, round(window_len * decode_from)), window_len - 1)


def decode_scorer(llm: Any, decode_from: float = DEFAULT_DECODE_FROM) -> Scorer:
    """Teacher-forced logits ``[n, vocab]`` (fp32) of a window through ``llm``'s generation path.

    The first ``s = decode_split(n)`` tokens are prefilled through ``llm.make_cache`` (the KV policy's cache,
    which compresses after prefill); tokens ``s .. n-2`` are then fed one decode step each, so prediction
    ``i >= s`` (of token ``i + 1``) is made from the policy's cache, as in generation. Rows ``< s`` are the
    prefill's own logits (exact attention over the prompt, as every policy's prefill is). A prompt selector (GemFilter)
    prefills only its selected tokens, positions renumbered from 0 as ``LLM.generate`` does; the prompt rows
    then come from a separate exact pass over the whole prefix; so do SpecKV's, whose prefill appends the draft's
    lookahead (``kv.speckv.prefill_with_lookahead``).
    """
    spec = llm.kv_spec

    @torch.inference_mode()
    def score(ids: list[int]) -> torch.Tensor:
        n = len(ids)
        s = decode_split(n, decode_from)
        dev, model = llm.device, llm.model
        prefix = list(ids[:s])
        # A prompt selector, and SpecKV (the draft's lookahead joins its prefill): prompt rows from an exact pass.
        if spec is not None and (spec.selector is not None or getattr(llm, "kv_draft", None) is not None):
            from frugallm.kv import select_prompt_tokens

            prompt_rows = llm.score(prefix)[:-1].float()
            prefix = select_prompt_tokens(spec, model, prefix) or prefix
        else:
            prompt_rows = None
        cache = llm.make_cache(1, len(prefix) + n - s)
        x = torch.tensor([prefix], device=dev)
        positions = torch.arange(len(prefix), device=dev)[None]
        if prompt_rows is None:
            pre = model(x, positions, cache, "all")[0].float()
        else:  # only the prompt's last row is used
            from frugallm.kv.speckv import prefill_with_lookahead

            pre = prefill_with_lookahead(spec, model, x, positions, cache).float()
        rows = [pre if prompt_rows is None else torch.cat([prompt_rows, pre[-1:]])]
        pos = len(prefix)
        for t in ids[s:-1]:  # the last token predicts nothing inside the window
            step = model(torch.tensor([[t]], device=dev), torch.tensor([[pos]], device=dev), cache, "last")
            rows.append(step.float())
            pos += 1
        rows.append(torch.zeros(1, pre.shape[-1], device=dev))  # the last token's row (dropped by the caller)
        return torch.cat(rows)

    return score


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
    path: str = PREFILL_PATH  # how the logits were made ("prefill", or the decode path with a KV policy)
    decode_from: int | None = None  # decode path: tokens prefilled per window before the decode steps
    decode_kl_divergence: float | None = None  # decode path: KL over the predictions made by decode steps only
    decode_top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(score: Scorer, tokenizer: Any, *, model_key: str, make_reference: Callable[[], Scorer] | None,
             is_reference: bool = False, corpus_text: str | None = None, corpus_name: str = "builtin",
             windows: int = DEFAULT_WINDOWS, window_len: int = DEFAULT_WINDOW_LEN,
             decode_from: int | None = None, path: str = PREFILL_PATH) -> QualityResult:
    """Perplexity of ``score`` on the corpus and its KL / agreement against the reference model.

    ``is_reference``: this scorer *is* the unmodified float32 model, so its log-probs become the cached
    reference (KL is then exactly 0). ``make_reference`` None skips KL / agreement. ``decode_from``: the
    scorer's predictions from this token on came from decode steps (:func:`decode_scorer`); KL / agreement
    are then also reported over those alone.
    """
    if corpus_text is None:
        from frugallm.corpus import builtin_corpus

        corpus_text = builtin_corpus()
    wins = corpus_windows(tokenizer, corpus_text, windows, window_len)
    lp = window_logprobs(score, wins)
    ppl, nll, count = perplexity(lp, wins)
    kl = agree = dkl = dagree = None
    if is_reference:
        remember_reference(model_key, wins, lp)
    if is_reference or make_reference is not None:
        ref = reference_logprobs(model_key, wins, make_reference or (lambda: score))
        kl, agree = compare(lp, ref)
        if decode_from is not None:
            dkl, dagree = compare(lp, ref, start=decode_from)
    return QualityResult(ppl, nll, kl, agree, count, windows, window_len, corpus_name,
                         f"{model_key} (frugallm, float32, no quant/kv)", path, decode_from, dkl, dagree)


def evaluate_llm(llm: Any, *, model_key: str, make_reference: Callable[[], Scorer] | None,
                 is_reference: bool = False, corpus_text: str | None = None, corpus_name: str = "builtin",
                 windows: int = DEFAULT_WINDOWS, window_len: int = DEFAULT_WINDOW_LEN,
                 decode_from: float = DEFAULT_DECODE_FROM) -> QualityResult:
    """:func:`evaluate` for a frugallm ``LLM``: one teacher-forced pass (``score``) without a KV policy; with
    one, the generation path (:func:`decode_scorer`), where the policy runs."""
    if llm.kv_spec is None:
        return evaluate(lambda ids: llm.score(ids).float(), llm.tokenizer, model_key=model_key,
                        make_reference=make_reference, is_reference=is_reference, corpus_text=corpus_text,
                        corpus_name=corpus_name, windows=windows, window_len=window_len)
    s = decode_split(window_len, decode_from)
    path = (f"decode: each window's first {s} tokens prefilled with the KV policy, then {window_len - s - 1} "
            "teacher-forced decode steps through its cache")
    return evaluate(decode_scorer(llm, decode_from), llm.tokenizer, model_key=model_key,
                    make_reference=make_reference, is_reference=False, corpus_text=corpus_text,
                    corpus_name=corpus_name, windows=windows, window_len=window_len, decode_from=s, path=path)
