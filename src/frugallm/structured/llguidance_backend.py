"""llguidance (Microsoft's constrained-decoding library): JSON schemas and Lark grammars over our tokenizer.json.

Picked over xgrammar by ``benchmarks/structured_pick.py`` (default model, 49k vocabulary, 20 schemas): a schema
compiles in ~0.4 ms (xgrammar ~6-18 ms, paid per request since each request brings its own schema), the mask of
a step takes ~0.02 ms (both far below a decode step), it reads the ``tokenizers`` JSON directly (byte-level and
SentencePiece vocabularies alike) and needs no ``transformers``.
"""

from __future__ import annotations

import llguidance
import llguidance.torch as llg_torch
import torch

from frugallm.errors import InvalidRequestError
from frugallm.structured.backend import BACKENDS, GrammarBackend, Matcher
from frugallm.tokenizer.tokenizer import Tokenizer


class LLGuidanceMatcher(Matcher):
    def __init__(self, m: llguidance.LLMatcher) -> None:
        self.m = m

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        llg_torch.fill_next_token_bitmask(self.m, bitmask, row)

    def accept(self, token: int) -> bool:
        return self.m.consume_token(token)

    def copy(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.m.deep_copy())

    @property
    def done(self) -> bool:
        return self.m.is_stopped() or self.m.is_error()


@BACKENDS.register("llguidance")
class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        self.ll_tokenizer = llguidance.LLTokenizer(tokenizer.to_dict()["tokenizer"], n_vocab=vocab_size,
                                                   eos_token=sorted(tokenizer.eos_ids) or None)

    def compile(self, kind: str, text: str) -> Matcher:
        try:
            if kind == "json_schema":
                # Compact separators and no free whitespace: a model cannot loop on blanks between tokens.
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    text, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
            elif kind == "grammar":
                grammar = llguidance.LLMatcher.grammar_from_lark(text)
            else:
                raise InvalidRequestError(f"unknown constraint kind {kind!r}")
        except ValueError as e:
            raise InvalidRequestError(f"{kind}: {e}", kind) from None
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"{kind} cannot be compiled: {m.get_error()}", kind)
        return LLGuidanceMatcher(m)
