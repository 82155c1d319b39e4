"""Sampling: parameter validation, filters never leak disallowed tokens, penalties, seeds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from frugallm.errors import InvalidRequestError
from frugallm.sampling import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    prompt_logprobs,
    sample_batch,
    sample_token,
    shape_logits,
)

VOCAB = 50


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_params_name_the_problem(kwargs: dict, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        SamplingParams(**kwargs)


def test_stop_string_normalised_to_tuple() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)


logits_st = st.lists(st.floats(-20, 20, allow_nan=False), min_size=VOCAB, max_size=VOCAB).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32)
)


@settings(max_examples=60, deadline=None)
@given(logits=logits_st, k=st.integers(1, VOCAB), seed=st.integers(0, 2**31 - 1))
def test_top_k_only_emits_top_k(logits: torch.Tensor, k: int, seed: int) -> None:
    p = SamplingParams(temperature=1.0, top_k=k)
    allowed = set(torch.nonzero(logits >= torch.topk(logits, k).values[-1]).flatten().tolist())
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        assert sample_token(logits.clone(), p, g) in allowed


@settings(max_examples=60, deadline=None)
@given(logits=logits_st, top_p=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_top_p_only_emits_nucleus(logits: torch.Tensor, top_p: float, seed: int) -> None:
    p = SamplingParams(temperature=0.7, top_p=top_p)
    probs = (logits / 0.7).softmax(-1)
    sp, idx = probs.sort(descending=True)
    # the nucleus: tokens whose preceding mass is < top_p (ties at the boundary may add tokens)
    before = sp.cumsum(0) - sp
    # Tied probabilities sort in any order: every token as likely as the nucleus' least likely one counts.
    floor = sp[before < top_p + 1e-6].min()
    allowed = set(torch.nonzero(probs >= floor - 1e-7).flatten().tolist())
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        assert sample_token(logits.clone(), p, g) in allowed
    kept = torch.isfinite(filter_logits(logits.clone(), p))
    assert kept.any()


@settings(max_examples=60, deadline=None)
@given(logits=logits_st, min_p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_min_p_only_emits_above_threshold(logits: torch.Tensor, min_p: float, seed: int) -> None:
    p = SamplingParams(temperature=1.0, min_p=min_p)
    probs = logits.softmax(-1)
    allowed = set(torch.nonzero(probs >= min_p * probs.max() - 1e-7).flatten().tolist())
    g = torch.Generator().manual_seed(seed)
    assert sample_token(logits.clone(), p, g) in allowed


def test_greedy_is_argmax() -> None:
    logits = torch.randn(VOCAB)
    assert sample_token(logits, SamplingParams(temperature=0), None) == int(logits.argmax())


def test_same_seed_same_tokens() -> None:
    logits = torch.randn(VOCAB)
    p = SamplingParams(temperature=1.0)
    a = [sample_token(logits, p, g) for g in [torch.Generator().manual_seed(7)] for _ in range(20)]
    b = [sample_token(logits, p, g) for g in [torch.Generator().manual_seed(7)] for _ in range(20)]
    assert a == b


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_penalties(
        logits.clone(), SamplingParams(repetition_penalty=2.0), torch.tensor([0, 1]), torch.tensor([], dtype=torch.long)
    )
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_presence_and_frequency_penalties_count_output_tokens() -> None:
    logits = torch.zeros(4)
    out = apply_penalties(
        logits.clone(),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        torch.tensor([3]),
        torch.tensor([1, 1, 2]),
    )
    assert out.tolist() == pytest.approx([0.0, -1.0, -0.75, 0.0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 5e-324},  # smallest positive double: logits / it overflow
        {"temperature": 1e-300},
        {"top_p": 1e-300},  # rounds to 0 in fp32
        {"repetition_penalty": 1e-308},  # positive logits / it -> inf
        {"repetition_penalty": 1e308},
        {"temperature": 1e300, "top_k": 1},
    ],
)
def test_extreme_but_valid_params_still_sample(kwargs: dict) -> None:
    """Values the API accepts must never turn logits into inf/NaN (found by the OpenAPI fuzz test)."""
    torch.manual_seed(0)
    logits = torch.randn(50) * 5
    params = SamplingParams(**kwargs)
    hist = torch.tensor([1, 2, 3]), torch.tensor([4, 4])
    g = torch.Generator().manual_seed(1)
    tok = sample_token(logits.clone(), params, g, *hist)
    assert 0 <= tok < 50
    if params.temperature < 1e-5:
        assert params.greedy and tok == int(logits.argmax())


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
    ],
)
def test_invalid_new_params_name_the_problem(kwargs: dict, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        SamplingParams(**kwargs)


def test_logit_bias_clamped_and_vocab_checked() -> None:
    p = SamplingParams(logit_bias={3: 500, 1: -2})
    assert p.logit_bias == ((1, -2.0), (3, 100.0)) and hash(p)
    p.check_vocab(4)
    with pytest.raises(InvalidRequestError, match="logit_bias.*out of range"):
        p.check_vocab(3)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(9,)).check_vocab(5)


class _Seq:
    """The fields of a Sequence that sampling reads."""

    def __init__(self, params: SamplingParams, output_ids: list[int], stop_ids: set[int]) -> None:
        self.params, self.prompt_ids, self.output_ids, self.stop_ids = params, [0], output_ids, stop_ids
        self.generator, self.logprobs, self.finished = None, None, False


def test_logit_bias_and_min_tokens_shape_the_pick() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 5.0  # the greedy pick, and a stop id
    seqs = [_Seq(SamplingParams(temperature=0, logit_bias={11: 10}), [], {7}),
            _Seq(SamplingParams(temperature=0, min_tokens=2), [3], {7})]
    assert sample_batch(logits.clone(), seqs) == [11, int(logits[1, :7].argmax())]
    seqs[1].output_ids = [3, 4]  # min_tokens reached: the stop id may come
    assert sample_batch(logits.clone(), seqs) == [11, 7]
    row = shape_logits(logits[0].clone(), seqs[0])
    assert row[11] == 10 and row[7] == 5  # the bias adds to the logit


def test_prompt_logprobs_match_log_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=g)
    targets = torch.randint(0, VOCAB, (6,), generator=g)
    lp = logits.log_softmax(-1)
    out = prompt_logprobs(logits, targets, 3)
    for t, entry in enumerate(out):
        top = lp[t].topk(3)
        want = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        want[int(targets[t])] = float(lp[t, targets[t]])
        assert entry.keys() == want.keys() and all(abs(entry[k] - want[k]) < 1e-6 for k in want)
    assert [list(e) for e in prompt_logprobs(logits, targets, 0)] == [[int(x)] for x in targets]
