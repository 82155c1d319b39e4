"""Which KV specs run under continuous batching (kv.paged_policy), and the errors for those that do not."""

from __future__ import annotations

import pytest

from frugallm.kv import KV_POLICIES, KVSpecError, paged_names, paged_policy, paged_quantizer


def test_paged_names_are_the_flagged_policies() -> None:
    assert paged_names() == ["h2o", "kivi", "snapkv", "speckv", "streamingllm"]
    assert all(KV_POLICIES.get(n).pages for n in paged_names())


@pytest.mark.parametrize("spec", ["snapkv:budget=0.25", "h2o:budget=0.5,recent=0.25",
                                  "streamingllm:budget=0.25,positions=original",
                                  "streamingllm:sinks=4,window=64,positions=original"])
def test_paging_specs(spec: str) -> None:
    ev = paged_policy(spec)
    assert ev is not None and ev.pages and paged_policy(ev.describe()) == ev


@pytest.mark.parametrize("spec", [None, "", "full", "none"])
def test_plain_cache_is_no_policy(spec: str | None) -> None:
    assert paged_policy(spec) is None


@pytest.mark.parametrize(("spec", "why"), [
    ("xquant:bits=2", "xquant cannot run under continuous batching"),
    ("snapkv:budget=0.25+xquant:bits=2", "xquant cannot"),
    ("think:ratio=0.5", "think cannot"),
    ("h2o:budget=0.5+kivi:bits=2", "compresses at prefill alone"),  # kivi packs after a prefill-time evictor only
    ("kivi:bits=2,vgroup=16", "vgroup"),
    ("streamingllm:budget=0.25", "positions=original"),  # positions=cache re-rotates keys by slot
])
def test_other_specs_name_the_paging_policies(spec: str, why: str) -> None:
    with pytest.raises(KVSpecError, match=why) as e:
        paged_policy(spec)
    if "cannot" in why:
        assert "h2o, kivi, snapkv, speckv, streamingllm" in str(e.value)


@pytest.mark.parametrize("spec", ["kivi:bits=2", "kivi:bits=4,residual=64", "snapkv:budget=0.25+kivi:bits=2"])
def test_kivi_pages_alone_or_after_snapkv(spec: str) -> None:
    ev = paged_policy(spec)
    assert (ev is None) == spec.startswith("kivi")
    q = paged_quantizer(spec)
    assert q is not None and q.name == "kivi"
    assert paged_quantizer("snapkv:budget=0.25") is None


def test_prefill_queries() -> None:
    assert paged_policy("snapkv:window=16").prefill_queries(100) == 16
    assert paged_policy("snapkv:window=16").prefill_queries(10) == 10
    assert paged_policy("h2o").prefill_queries(100) == 100  # every prompt query
    assert paged_policy("streamingllm:budget=0.5,positions=original").prefill_queries(100) == 1
