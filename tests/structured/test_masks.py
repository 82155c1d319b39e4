"""``apply_bitmask``: bit ``t % 32`` of word ``t // 32`` allows token ``t``; only the listed rows change."""

from __future__ import annotations

import pytest
import torch

from frugallm.structured import apply_bitmask


def bitmask_of(allowed: list[set[int]], vocab: int) -> torch.Tensor:
    """The ``[len(allowed), ceil(vocab / 32)]`` int32 bitmask built bit by bit (the reference layout)."""
    words = (vocab + 31) // 32
    out = torch.zeros(len(allowed), words, dtype=torch.int64)
    for r, toks in enumerate(allowed):
        for t in toks:
            out[r, t // 32] |= 1 << (t % 32)
    # int32 words: bit 31 is the sign bit (what llguidance writes), so wrap into int32's range
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 63, 64, 65, 100, 384, 49152 + 7])
def test_apply_bitmask_matches_reference(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=g)
    before = logits.clone()
    allowed = [
        {int(t) for t in torch.randint(0, vocab, (max(1, vocab // 3),), generator=g)},
        {vocab - 1},  # the last id: the partial last word
        set(range(vocab)),  # everything allowed: the row is unchanged
    ]
    rows = [0, 2, 3]  # row 1 is unconstrained
    apply_bitmask(logits, bitmask_of(allowed, vocab), rows)
    assert torch.equal(logits[1], before[1])
    for r, toks in zip(rows, allowed, strict=True):
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[list(toks)] = True
        assert torch.equal(logits[r][keep], before[r][keep])
        assert torch.isneginf(logits[r][~keep]).all()


def test_bit_31_is_token_31() -> None:
    """The sign bit of a word is its 32nd token (int32 words, no unsigned type in torch)."""
    logits = torch.zeros(1, 64)
    apply_bitmask(logits, torch.tensor([[-(2**31), 1]], dtype=torch.int32), [0])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [31, 32]


def test_words_past_the_vocabulary_are_ignored() -> None:
    """A backend may size the mask to its own (larger) vocabulary: bits past the logits are dropped."""
    logits = torch.zeros(2, 40)
    mask = torch.full((1, 4), -1, dtype=torch.int32)  # 128 tokens allowed, 40 exist
    mask[0, 0] = 0b101
    apply_bitmask(logits, mask, [1])
    assert torch.isfinite(logits[0]).all()
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [0, 2, *range(32, 40)]


def test_nothing_allowed_masks_the_whole_row() -> None:
    logits = torch.randn(1, 70)
    apply_bitmask(logits, torch.zeros(1, 3, dtype=torch.int32), [0])
    assert torch.isneginf(logits).all()


def test_torch_unpacking_path_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shift-based unpacking (CUDA logits, big-endian hosts) gives the numpy path's result."""
    from frugallm.structured import masks

    g = torch.Generator().manual_seed(3)
    vocab = 1000
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 32), dtype=torch.int32, generator=g)
    logits = torch.randn(5, vocab, generator=g)
    a, b = logits.clone(), logits.clone()
    apply_bitmask(a, bitmask, [0, 2, 4])
    monkeypatch.setattr(masks.sys, "byteorder", "big")
    apply_bitmask(b, bitmask, [0, 2, 4])
    assert torch.equal(a, b) and torch.isneginf(a).any() and torch.equal(a[1], logits[1])
