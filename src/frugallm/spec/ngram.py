"""``ngram``: prompt lookup decoding (Saxena 2023; llama.cpp's ``--spec-type ngram``, transformers'
``prompt_lookup_num_tokens``). Code edits, summaries and RAG answers copy long spans of their prompt; the
continuation of the latest earlier occurrence of the last few tokens is a free, often exact, guess.
"""

from __future__ import annotations

import torch

from frugallm.sampling import SamplingParams
from frugallm.spec.proposer import PROPOSERS, Draft, Proposer


@PROPOSERS.register("ngram")
class NgramProposer(Proposer):
    """Match the last ``n`` .. ``min_n`` tokens (longest first) against every earlier position.

    An index per length maps each n-gram to the latest position it ended at (with at least one token after
    it), extended incrementally as tokens are committed: a lookup costs O(n), not a scan of the context.
    """

    free = True  # a dictionary lookup: it keeps guessing while speculation is off (shadow rounds)

    def __init__(self, n: int = 3, min_n: int = 1) -> None:
        self.n, self.min_n = n, min_n
        self._index: list[dict[tuple[int, ...], int]] = []
        self._done = 0  # grams ending before this position are indexed

    def begin(self, prompt_ids: list[int], capacity: int) -> None:
        self._index = [{} for _ in range(self.n + 1)]
        self._done = 0

    def _extend(self, tokens: list[int]) -> None:
        if self._done > len(tokens):  # a shorter sequence than indexed: a new one without begin()
            self.begin(tokens, 0)
        # A gram ending at e is usable once tokens[e + 1] exists: index ends up to len - 2.
        for end in range(self._done, len(tokens) - 1):
            for m in range(self.min_n, self.n + 1):
                if end + 1 >= m:
                    self._index[m][tuple(tokens[end + 1 - m : end + 1])] = end
        self._done = max(self._done, len(tokens) - 1)

    def propose(
        self, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        if not self._index:
            self.begin(tokens, 0)
        self._extend(tokens)
        for m in range(min(self.n, len(tokens)), self.min_n - 1, -1):
            end = self._index[m].get(tuple(tokens[len(tokens) - m :]))
            if end is not None:
                return Draft(tokens[end + 1 : end + 1 + k])
        return Draft([])
