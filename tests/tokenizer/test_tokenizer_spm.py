"""SentencePiece-style GGUF vocabularies (``tokenizer.ggml.model == "llama"``: Llama 2, TinyLlama, Mistral).

A tiny SPM GGUF is written from scratch: ``<unk>``, ``<s>``, ``</s>``, the 256 byte-fallback tokens, then the
pieces (with ``▁`` word markers) a BPE learns on some text, scored by merge order like sentencepiece does.
The engine tokenizer is checked against

* a Python port of llama.cpp's SPM tokenizer (``llm_tokenizer_spm_session`` + the special-token partition
  and space-prefix rule of ``llama_vocab::impl::tokenize``), on every text, and
* transformers' GGUF tokenizer loading (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), on texts whose
  first character is not whitespace. transformers uses ``Metaspace(prepend_scheme="first")``, which adds no
  ``▁`` to text that already starts with a space: it turns ``"  hi"`` into ``▁▁hi`` where llama.cpp and
  sentencepiece give ``▁▁▁hi``. We follow llama.cpp there.
"""

from __future__ import annotations

import heapq
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

import tiny_models as tm
from frugallm.loading.gguf_file import GGUFModelFile
from frugallm.tokenizer.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
USER_TOKEN = "<|user|>"  # a user-defined (type 4) token, kept whole like llama.cpp does

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. A language model predicts the next token from the tokens "
    "before it, and the tokenizer turns text into those tokens. Quantization stores weights in fewer bits."
)
TEXTS = [
    ENGLISH,
    "Hello world",
    "Hello  world,   multiple    spaces and trailing  ",
    "line one\nline two\n\nline four\r\nend\n",
    "numbers 0 7 42 2024-06-15 3.14159 1234567890",
    "café naïve Ünïcödé Straße ñ Ελληνικά русский 日本語 中文 한국어",
    "emoji 🦙🚀✨ and symbols ±×÷≠€£¥",
    "tabs\tand\tcode: def f(x):\n    return x ** 2  # square",
    "unknown pieces: qqqzzzxxx ☃ \u0007 \U0001f9ec",
    "a",
    ".",
    "",
    tm.MIXED_TEXT,
]
# Texts where transformers (Metaspace "first") and llama.cpp disagree: leading whitespace.
LEADING_SPACE_TEXTS = [" Hello", "  two leading", "\nnewline first", "\t tab", "   ", " "]
# A literal ▁ is a space to sentencepiece: it encodes like one and decodes to one.
MARKER_TEXTS = ["▁literal▁markers ▁", "▁▁x"]
SPECIAL_TEXTS = [
    "<s>Hello</s>",
    "Hello</s> world</s>\nnext",
    "<s> spaced</s>  double",
    f"{USER_TOKEN}\nHi there</s>\n<|assistant|>\nHello!",
    "no<unk>here",
    "<s></s>",
    "</s>",
]


# ----------------------------------------------------------------------------------------------------------
# the tiny SPM vocabulary and GGUF
# ----------------------------------------------------------------------------------------------------------


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types laid out like a Llama-2 GGUF (specials, bytes, pieces)."""
    lines = [*tm._corpus_lines(), ENGLISH]
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # a small alphabet, so that rarer characters (é, ß, CJK, emoji) go to byte fallback
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=700, limit_alphabet=60, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    # sentencepiece has no pieces with newlines or tabs: those always go to byte fallback (<0x0A>)
    merged = [piece for piece in ("".join(m) for m in model["merges"]) if not set(piece) & set("\n\r\t")]
    alphabet = [t for t in model["vocab"] if len(t) == 1 and t not in merged and t not in "\n\r\t"]

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    # sentencepiece BPE: a piece learned earlier has a higher score; single characters come last
    for rank, piece in enumerate(merged):
        tokens.append(piece)
        scores.append(-float(rank))
        types.append(NORMAL)
    for i, ch in enumerate(alphabet):
        tokens.append(ch)
        scores.append(-float(len(merged) + i))
        types.append(NORMAL)
    tokens.append(USER_TOKEN)
    scores.append(0.0)
    types.append(USER_DEFINED)
    assert len(set(tokens)) == len(tokens)
    return tokens, scores, types


def _write_spm_gguf(path: Path, *, add_space_prefix: bool = True) -> Path:
    tokens, scores, types = _spm_vocab()
    n_embd = 8
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("model")
    w.add_name("tiny-spm")
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(16)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(n_embd // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(add_space_prefix)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_spm_gguf(tmp_path_factory.mktemp("spm") / "tiny-spm.gguf")


@pytest.fixture(scope="module")
def meta(spm_gguf: Path):
    return GGUFModelFile(spm_gguf).tokenizer_meta()


@pytest.fixture(scope="module")
def engine_tok(meta) -> Tokenizer:
    return Tokenizer.from_gguf_meta(meta)


@pytest.fixture(scope="module")
def hf_tok(spm_gguf: Path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    tm.quiet_transformers()
    return AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)


# ----------------------------------------------------------------------------------------------------------
# llama.cpp's SPM tokenizer, ported (src/llama-vocab.cpp)
# ----------------------------------------------------------------------------------------------------------


def _spm_session(text: str, vocab: dict[str, int], scores: list[float]) -> list[int]:
    """``llm_tokenizer_spm_session::tokenize``: merge the adjacent pair whose concatenation is the
    highest-scoring vocabulary piece (ties: leftmost), then resegment, falling back to byte tokens."""
    syms = [[i - 1, i + 1 if i + 1 < len(text) else -1, i, 1] for i in range(len(text))]  # prev, next, start, n
    queue: list[tuple[float, int, int, int]] = []
    rev_merge: dict[str, tuple[int, int]] = {}

    def sym_text(i: int) -> str:
        return text[syms[i][2] : syms[i][2] + syms[i][3]]

    def try_add_bigram(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        piece = text[syms[left][2] : syms[left][2] + syms[left][3] + syms[right][3]]
        tid = vocab.get(piece)
        if tid is None:
            return
        heapq.heappush(queue, (-scores[tid], left, right, len(piece)))
        rev_merge[piece] = (left, right)

    for i in range(1, len(syms)):
        try_add_bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        ls, rs = syms[left], syms[right]
        if ls[3] == 0 or rs[3] == 0 or ls[3] + rs[3] != size:
            continue
        ls[3] += rs[3]
        rs[3] = 0
        ls[1] = rs[1]
        if rs[1] >= 0:
            syms[rs[1]][0] = left
        try_add_bigram(ls[0], left)
        try_add_bigram(left, ls[1])

    out: list[int] = []

    def resegment(i: int) -> None:
        piece = sym_text(i)
        if piece in vocab:
            out.append(vocab[piece])
        elif piece in rev_merge:
            resegment(rev_merge[piece][0])
            resegment(rev_merge[piece][1])
        else:
            out.extend(vocab[f"<0x{b:02X}>"] for b in piece.encode("utf-8"))

    i = 0 if syms else -1
    while i != -1:
        resegment(i)
        i = syms[i][1]
    return out


def llama_cpp_tokenize(meta, text: str, add_special: bool = False) -> list[int]:
    """``llama_tokenize(..., add_special, parse_special=True)`` for an SPM vocabulary."""
    vocab = {t: i for i, t in enumerate(meta.tokens)}
    special = sorted(
        (t for t, ty in zip(meta.tokens, meta.token_types, strict=True) if ty in (UNKNOWN, CONTROL, USER_DEFINED)),
        key=len,
        reverse=True,
    )
    parts = re.split("(" + "|".join(map(re.escape, special)) + ")", text)
    out: list[int] = []
    prev_special = True  # prefix with a space if the previous fragment was a special token (or none)
    if add_special and meta.add_bos:
        out.append(meta.bos_id)
    for k, part in enumerate(parts):
        if k % 2:
            out.append(vocab[part])
            prev_special = True
        elif part:
            raw = (" " if meta.add_space_prefix and prev_special else "") + part
            out += _spm_session(raw.replace(" ", "▁"), vocab, meta.scores)
            prev_special = False
    return out


def test_llama_cpp_port_sanity(meta) -> None:
    vocab = {t: i for i, t in enumerate(meta.tokens)}
    ids = llama_cpp_tokenize(meta, "the the")
    assert ids == [vocab["▁the"], vocab["▁the"]]
    # characters outside the vocabulary become their UTF-8 bytes
    assert llama_cpp_tokenize(meta, "\u2603")[-3:] == [vocab[f"<0x{b:02X}>"] for b in "\u2603".encode()]


# ----------------------------------------------------------------------------------------------------------
# the engine tokenizer
# ----------------------------------------------------------------------------------------------------------


def test_meta_reads_spm_fields(meta) -> None:
    assert meta.model == "llama"
    assert (meta.bos_id, meta.eos_id, meta.unk_id) == (BOS_ID, EOS_ID, UNK_ID)
    assert meta.add_bos and meta.add_space_prefix
    assert meta.tokens[3] == "<0x00>" and meta.token_types[3] == BYTE
    assert len(meta.scores) == len(meta.tokens)


@pytest.mark.parametrize("text", TEXTS + LEADING_SPACE_TEXTS + MARKER_TEXTS + SPECIAL_TEXTS)
def test_encode_matches_llama_cpp(engine_tok: Tokenizer, meta, text: str) -> None:
    assert engine_tok.encode(text) == llama_cpp_tokenize(meta, text)
    expected = llama_cpp_tokenize(meta, text, add_special=True)
    if text.startswith("<s>"):  # llama.cpp adds a second BOS here (and warns); the engine adds none
        expected = expected[1:]
    assert engine_tok.encode(text, add_special_tokens=True) == expected


def test_encode_matches_transformers(engine_tok: Tokenizer, hf_tok) -> None:
    for text in TEXTS:
        assert engine_tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
        assert engine_tok.encode(text, add_special_tokens=True) == hf_tok.encode(text), text


def test_decode_matches_transformers_and_round_trips(engine_tok: Tokenizer, hf_tok) -> None:
    for text in TEXTS:
        ids = engine_tok.encode(text)
        assert engine_tok.decode(ids) == text
        assert engine_tok.decode(ids) == hf_tok.decode(ids)
        with_bos = engine_tok.encode(text, add_special_tokens=True)
        assert with_bos[0] == BOS_ID
        assert engine_tok.decode(with_bos) == text
        assert engine_tok.decode(with_bos, skip_special_tokens=False) == hf_tok.decode(
            with_bos, skip_special_tokens=False
        )
    for text in LEADING_SPACE_TEXTS:  # sentencepiece keeps every leading space
        assert engine_tok.decode(engine_tok.encode(text)) == text


def test_byte_fallback_and_pieces(engine_tok: Tokenizer, meta) -> None:
    vocab = {t: i for i, t in enumerate(meta.tokens)}
    assert "🦙" not in vocab
    ids = engine_tok.encode("🦙")
    assert ids[-4:] == [vocab[f"<0x{b:02X}>"] for b in "🦙".encode()]
    assert engine_tok.decode(ids) == "🦙"
    assert vocab["<0x0A>"] in engine_tok.encode("a\nb")
    assert UNK_ID not in engine_tok.encode(tm.MIXED_TEXT)
    assert engine_tok.encode("the")[0] == vocab["▁the"]


def test_bos_and_eos(engine_tok: Tokenizer) -> None:
    assert engine_tok.bos_id == BOS_ID and engine_tok.add_bos
    assert EOS_ID in engine_tok.eos_ids
    assert engine_tok.encode("Hello", add_special_tokens=True)[0] == BOS_ID
    assert engine_tok.encode("Hello", add_special_tokens=True)[1:] == engine_tok.encode("Hello")
    assert engine_tok.encode("", add_special_tokens=True) == [BOS_ID]
    assert engine_tok.encode("<s>Hi", add_special_tokens=True).count(BOS_ID) == 1


def test_cache_round_trip(engine_tok: Tokenizer) -> None:
    again = Tokenizer.from_dict(json.loads(json.dumps(engine_tok.to_dict())))
    for text in TEXTS + LEADING_SPACE_TEXTS + MARKER_TEXTS + SPECIAL_TEXTS:
        assert again.encode(text) == engine_tok.encode(text)


def test_no_space_prefix(tmp_path: Path) -> None:
    meta = GGUFModelFile(_write_spm_gguf(tmp_path / "np.gguf", add_space_prefix=False)).tokenizer_meta()
    assert not meta.add_space_prefix
    tok = Tokenizer.from_gguf_meta(meta)
    for text in TEXTS + LEADING_SPACE_TEXTS + MARKER_TEXTS + SPECIAL_TEXTS:
        assert tok.encode(text) == llama_cpp_tokenize(meta, text), text
    for text in TEXTS + LEADING_SPACE_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_incremental_detokenization_keeps_word_boundaries(engine_tok: Tokenizer) -> None:
    # SentencePiece drops the leading space of the first decoded piece: streaming must not drop the
    # space of every new token (Sequence decodes a few already-read tokens in front of new ones).
    from detok import assert_incremental_matches_full

    for text in TEXTS:
        assert_incremental_matches_full(engine_tok, engine_tok.encode(text, add_special_tokens=False), True)
