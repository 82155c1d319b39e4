"""Prompt lookup: the latest earlier match of the longest suffix, its continuation, nothing without a match."""

from __future__ import annotations

from frugallm import SamplingParams
from frugallm.spec.ngram import NgramProposer

GREEDY = SamplingParams(temperature=0)


def propose(tokens: list[int], k: int, n: int = 3, min_n: int = 1) -> list[int]:
    p = NgramProposer(n=n, min_n=min_n)
    p.begin(tokens, 0)
    return p.propose(tokens, k, GREEDY, None).tokens


def test_continues_the_latest_match_of_the_longest_suffix() -> None:
    #          0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 5, 6, 7]
    # suffix (5, 6, 7) matches at 0..2 only: continue with 8, 9, 1, ...
    assert propose(tokens, 3) == [8, 9, 1]
    # with n=2 the suffix (6, 7) matched latest at 6..7: continue with 2, 5
    assert propose(tokens, 2, n=2) == [2, 5]


def test_continuation_is_cut_at_k_and_at_the_end() -> None:
    tokens = [1, 2, 3, 4, 1, 2]
    assert propose(tokens, 10) == [3, 4, 1, 2]
    assert propose(tokens, 1) == [3]


def test_no_match_and_min_n() -> None:
    assert propose([1, 2, 3, 4], 5) == []
    # only a 1-gram matches (token 2): allowed at min_n=1, not at min_n=2
    tokens = [2, 9, 8, 7, 3, 2]
    assert propose(tokens, 2) == [9, 8]
    assert propose(tokens, 2, min_n=2) == []


def test_index_grows_incrementally_and_matches_a_fresh_scan() -> None:
    p = NgramProposer(n=3)
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    p.begin(seq[:4], 0)
    for end in range(4, len(seq) + 1):
        assert p.propose(seq[:end], 4, GREEDY, None).tokens == propose(seq[:end], 4), end
