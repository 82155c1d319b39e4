"""Tokenizer built with Hugging Face ``tokenizers`` from GGUF metadata or ``tokenizer.json``.

GGUF byte-level BPE vocabularies get the pre-tokenizer regex llama.cpp uses for their
``tokenizer.ggml.pre`` type, so ids match both llama.cpp and ``transformers``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from frugallm.errors import ModelLoadError
from frugallm.tokenizer.chat_template import render_chat


@dataclass
class TokenizerMeta:
    """What GGUF stores about the tokenizer (``tokenizer.ggml.*`` keys); ``loading/gguf.py`` reads it."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    extra: dict[str, Any] = field(default_factory=dict)


# Pre-tokenizer split patterns by GGUF ``tokenizer.ggml.pre`` (the ones llama.cpp's vocab uses).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# pre type -> (split digits one by one first, regex)
_PRE_TOKENIZERS: dict[str, tuple[bool, str]] = {
    "default": (False, _GPT2),
    "gpt2": (False, _GPT2),
    "gpt-2": (False, _GPT2),
    "smollm": (True, _GPT2),
    "starcoder": (True, _GPT2),
    "refact": (True, _GPT2),
    "llama-bpe": (False, _LLAMA3),
    "llama3": (False, _LLAMA3),
    "smaug-bpe": (False, _LLAMA3),
    "dbrx": (False, _LLAMA3),
    "qwen2": (False, _QWEN2),
    "deepseek-r1-qwen": (False, _QWEN2),
}

# Control tokens that end a turn although the file may name another EOS (llama.cpp does the same).
_EOG_NAMES = {
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
    "<|return|>",
}

_CONTROL, _USER_DEFINED = 3, 4


def _bpe_from_gguf(meta: TokenizerMeta) -> HFTokenizer:
    vocab = {tok: i for i, tok in enumerate(meta.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    if meta.pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            f"unsupported tokenizer pre-type {meta.pre!r}; supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    digits, pattern = _PRE_TOKENIZERS[meta.pre]
    steps: list[Any] = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary, which stores pieces and scores but no merges.

    Every split of a piece into two vocabulary pieces is a merge ranked by the piece's score (llama.cpp merges
    the adjacent pair whose concatenation scores highest). Ties are ordered exactly like transformers'
    ``generate_merges`` (longer left part, then longer right part, then vocabulary order), so the ids match its
    GGUF tokenizer too.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for piece, score in dict(zip(tokens, scores, strict=True)).items():
        local = [
            (piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: equal keys keep their order
    return [(left, right) for left, right, _ in merges]


def _spm_from_gguf(meta: TokenizerMeta) -> HFTokenizer:
    """SentencePiece-BPE vocabularies (Llama 2, TinyLlama, Mistral): merges rebuilt from scores.

    Text is handled like llama.cpp and sentencepiece do: spaces become ``▁`` and, with ``add_space_prefix``,
    every text fragment (the whole text, or what follows a special token) gets one ``▁`` prepended, even when
    it already starts with a space. Characters outside the vocabulary fall back to ``<0xXX>`` byte tokens.
    """
    vocab = {tok: i for i, tok in enumerate(meta.tokens)}
    scores = [*meta.scores[: len(meta.tokens)], *[0.0] * (len(meta.tokens) - len(meta.scores))]
    unk = meta.tokens[meta.unk_id] if meta.unk_id is not None else "<unk>"
    tok = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=_spm_merges(meta.tokens, scores),
            unk_token=unk if unk in vocab else None,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    # A normalizer, not ``Metaspace(prepend_scheme="first")``: that one adds no ``▁`` to text starting with a
    # space and none after special tokens, unlike llama.cpp. Normalizers run on each piece between added tokens.
    steps: list[Any] = [normalizers.Prepend("▁")] if meta.add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    dec: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    if unk in vocab:  # llama.cpp parses the unknown token's text like a special token's
        tok.add_special_tokens([AddedToken(unk, special=True, normalized=False)])
    return tok


# Texts longer than this are encoded through ``encode_batch``, which releases the GIL (``encode`` holds it: a 2 MB
# prompt blocked every other thread for ~2 s); the same ids, one batch setup more.
_GIL_FREE_CHARS = 32_768


class Tokenizer:
    """Text <-> token ids, special tokens, end-of-generation ids and the chat template."""

    def __init__(
        self,
        tok: HFTokenizer,
        *,
        bos_id: int | None,
        eos_ids: set[int],
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_gguf_meta(cls, meta: TokenizerMeta) -> Tokenizer:
        if meta.model == "gpt2":
            tok = _bpe_from_gguf(meta)
        elif meta.model == "llama":
            tok = _spm_from_gguf(meta)
        else:
            raise ModelLoadError(f"unsupported GGUF tokenizer model {meta.model!r}; supported: gpt2, llama")
        special = [
            AddedToken(t, special=meta.token_types[i] == _CONTROL, normalized=False)
            for i, t in enumerate(meta.tokens)
            if meta.token_types[i] in (_CONTROL, _USER_DEFINED)
        ]
        tok.add_special_tokens([a for a in special if a.special])
        tok.add_tokens([a for a in special if not a.special])
        eos = {i for i in (meta.eos_id, meta.eot_id) if i is not None}
        eos |= {i for i, t in enumerate(meta.tokens) if t in _EOG_NAMES and meta.token_types[i] == _CONTROL}
        return cls(tok, bos_id=meta.bos_id, eos_ids=eos, add_bos=meta.add_bos, chat_template=meta.chat_template)

    @classmethod
    def from_hf_folder(cls, folder: Path, tok_config: dict[str, Any], model_config: dict[str, Any]) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot build tokenizer ({e})") from None

        def token_str(v: Any) -> str | None:
            return v.get("content") if isinstance(v, dict) else v

        def tid(s: str | None) -> int | None:
            return None if s is None else tok.token_to_id(s)

        bos_id = tid(token_str(tok_config.get("bos_token")))
        eos: set[int] = set()
        e = tid(token_str(tok_config.get("eos_token")))
        if e is not None:
            eos.add(e)
        gen_cfg = folder / "generation_config.json"
        sources = [model_config]
        if gen_cfg.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                sources.append(json.loads(gen_cfg.read_text()))
        for src in sources:
            ids = src.get("eos_token_id")
            eos |= set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        add_bos = bool(tok_config.get("add_bos_token", False))
        return cls(tok, bos_id=bos_id, eos_ids=eos, add_bos=add_bos, chat_template=template)

    # -- cache round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "tokenizer": self._tok.to_str(),
            "bos_id": self.bos_id,
            "eos_ids": sorted(self.eos_ids),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        return cls(
            HFTokenizer.from_str(d["tokenizer"]),
            bos_id=d["bos_id"],
            eos_ids=set(d["eos_ids"]),
            add_bos=d["add_bos"],
            chat_template=d["chat_template"],
        )

    # -- use --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it are parsed as special tokens.

        ``add_special_tokens=True`` prepends BOS when the model asks for it (and it is not there yet).
        """
        if len(text) > _GIL_FREE_CHARS:  # without the GIL: other threads (a server's event loop) go on
            ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """``messages`` rendered with the model's template; ``tools`` (OpenAI tool definitions) are passed to it
        as ``tools``, as transformers does (templates test ``{% if tools %}``)."""
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos_id = min(self.eos_ids) if self.eos_ids else None
        eos = self.id_to_token(eos_id) if eos_id is not None else ""
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos or "",
            eos_token=eos or "",
            tools=tools,
        )
