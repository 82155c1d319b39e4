"""``--spec`` strings: defaults, round trips and one clear error per mistake."""

from __future__ import annotations

import pytest

from frugallm.errors import FrugalError
from frugallm.spec import K_MAX, SpecConfig, SpecError, parse_spec


def test_defaults_and_round_trip() -> None:
    assert parse_spec("ngram") == SpecConfig("ngram", k=8)
    cfg = parse_spec("draft:model=qwen2.5-coder-0.5b:k=4")
    assert (cfg.method, cfg.model, cfg.k, cfg.adaptive) == ("draft", "qwen2.5-coder-0.5b", 4, True)
    assert parse_spec(str(cfg)) == cfg
    assert parse_spec("self:layers=8:adaptive=off") == SpecConfig("self", k=4, layers=8, adaptive=False)
    assert parse_spec("ngram:k=3:n=4:min_n=2") == SpecConfig("ngram", k=3, n=4, min_n=2)
    for off in (None, "", "off", "none"):
        assert parse_spec(off) is None


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("medusa:k=2", "valid: ngram, draft, self"),
        ("ngram:k=0", f"k must be in [1, {K_MAX}]"),
        (f"ngram:k={K_MAX + 1}", "k must be in"),
        ("ngram:k=two", "k must be an integer"),
        ("ngram:model=x", "ngram has no key 'model'; valid: k, adaptive, n, min_n"),
        ("ngram:k", "expected key=value"),
        ("ngram:n=2:min_n=3", "min_n <= n"),
        ("draft:k=4", "draft needs model="),
        ("self:layers=0", "layers must be >= 1"),
        ("ngram:adaptive=maybe", "adaptive must be on or off"),
        ("ngram:k=2:k=3", "k given twice"),
    ],
)
def test_errors_name_the_problem(spec: str, needle: str) -> None:
    with pytest.raises(SpecError, match=None) as e:
        parse_spec(spec)
    assert needle in str(e.value)
    assert isinstance(e.value, FrugalError)
