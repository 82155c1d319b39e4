"""Incremental detokenization in ``Sequence``: the streamed text equals decoding all output ids at once."""

from __future__ import annotations

import random

import pytest

from frugallm.engine.sequence import Sequence
from frugallm.loading import default_model_path
from frugallm.loading.gguf import GGUFModelFile
from frugallm.sampling import SamplingParams
from frugallm.tokenizer.tokenizer import Tokenizer


def assert_incremental_matches_full(tok: Tokenizer, ids: list[int], skip_special_tokens: bool) -> None:
    params = SamplingParams(max_tokens=len(ids) + 1, skip_special_tokens=skip_special_tokens, ignore_eos=True)
    seq = Sequence(0, None, [0], params, tok, 10**6)
    seq.stop_ids = set()  # every id is output text here, eos included
    for i, t in enumerate(ids, 1):
        seq.append(t)
        full = tok.decode(ids[:i], skip_special_tokens=skip_special_tokens)
        if not full.endswith("\ufffd"):  # a split UTF-8 character is held back, as before
            assert seq.text == full, (i, seq.text[-40:], full[-40:])


@pytest.fixture(scope="module")
def default_tok() -> Tokenizer:
    return Tokenizer.from_gguf_meta(GGUFModelFile(default_model_path()).tokenizer_meta())


@pytest.mark.parametrize("skip", [True, False])
def test_default_tokenizer_text_and_random_ids(default_tok: Tokenizer, skip: bool) -> None:
    text = "Hello wörld, 日本語 and emoji 😀🎉 in code: def f(x):\n    return x ** 2  # square"
    assert_incremental_matches_full(default_tok, default_tok.encode(text), skip)
    rng = random.Random(0)
    for _ in range(5):  # random ids split multi-byte characters and mix special tokens in
        assert_incremental_matches_full(default_tok, [rng.randrange(49152) for _ in range(80)], skip)
