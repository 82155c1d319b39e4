"""Incremental detokenization in ``Sequence``: the streamed text equals decoding all output ids at once."""

from __future__ import annotations

import random

import pytest

from detok import assert_incremental_matches_full
from frugallm.loading import default_model_path
from frugallm.loading.gguf_file import GGUFModelFile
from frugallm.tokenizer.tokenizer import Tokenizer


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
