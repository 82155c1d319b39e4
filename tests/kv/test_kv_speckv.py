"""SpecKV / SpecPC (draft-ranked KV eviction and prompt selection) on tiny random models: the budget is kept and
storage really shrinks, the lookahead never enters the cache, the lookahead's queries save a token SnapKV drops,
composition with KIVI, left-padded batches, the draft plumbing through ``LLM(kv=...)``, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from frugallm import LLM, SamplingParams
from frugallm.kv import KVSpecError, PrefillContext, build_kv_cache, parse_kv_spec, select_prompt_tokens
from frugallm.kv.snapkv import SnapKV
from frugallm.kv.speckv import SpecKV, attach_draft, draft_lookahead, prefill_with_lookahead
from frugallm.model.llama import Transformer
from frugallm.spec import SpecError
from kv_inputs import make_model

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def target() -> Transformer:
    model = make_model()
    attach_draft(model, make_model(num_layers=1, std=0.08), None, torch.float32)  # same vocabulary, shallower
    return model


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def cache_for(spec: str, model: Transformer, n: int, pads: list[int] | None = None):  # noqa: ANN201
    return build_kv_cache(spec, model, batch=1 if pads is None else len(pads), capacity=n + 32,
                          dtype=torch.float32, device="cpu", pad_lens=pads)


@torch.inference_mode()
def greedy_decode(model: Transformer, cache, logits: torch.Tensor, start: int, steps: int) -> list[int]:  # noqa: ANN001
    out = []
    for i in range(steps):
        tok = int(logits[0].argmax())
        out.append(tok)
        logits = model(torch.tensor([[tok]]), torch.tensor([[start + i]]), cache, "last")
    return out


@torch.inference_mode()
def test_budget_kept_storage_freed_and_lookahead_not_stored(target: Transformer) -> None:
    n, spec = 80, "speckv:budget=0.25,window=4,lookahead=6"
    ids, pos = prompt(n), torch.arange(n)[None]
    full = cache_for("full", target, n)
    ref = target(ids, pos, full, "last")
    cache = cache_for(spec, target, n)
    logits = prefill_with_lookahead(parse_kv_spec(spec), target, ids, pos, cache)
    keep = math.ceil(0.25 * n)
    assert [cache.slots(layer) for layer in range(2)] == [keep, keep]  # of the prompt's 80, not of 80 + 6
    assert cache.nbytes() <= 0.3 * full.nbytes()  # evicted slots left storage (stats included)
    # The lookahead follows the prompt causally: the prompt's last logits are the plain prefill's.
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_full_budget_decodes_exactly_like_the_full_cache(target: Transformer) -> None:
    """budget=1 keeps every prompt slot: decoding must continue at the prompt's end as if no lookahead ran."""
    n, spec = 40, "speckv:budget=1.0,window=4,lookahead=8"
    ids, pos = prompt(n, 1), torch.arange(n)[None]
    full = cache_for("full", target, n)
    expect = greedy_decode(target, full, target(ids, pos, full, "last"), n, 10)
    cache = cache_for(spec, target, n)
    got = greedy_decode(target, cache, prefill_with_lookahead(parse_kv_spec(spec), target, ids, pos, cache), n, 10)
    assert got == expect and cache.slots(0) == n + 10


def test_lookahead_queries_keep_the_token_snapkv_drops() -> None:
    """Window queries look at slots 20-29; the (future) lookahead queries look at slot 5 only. SnapKV keeps what
    the window sees; SpecKV, voting with the lookahead too, keeps slot 5."""
    t, d, la = 40, 8, 4
    e, u = torch.zeros(d), torch.zeros(d)
    e[0], u[1] = 1.0, 1.0
    keys = 0.01 * torch.randn(1, 1, t, d, generator=torch.Generator().manual_seed(0))
    keys[0, 0, :, 0] = 0.0
    keys[0, 0, 20:30] += 3.0 * u
    keys[0, 0, 5] = 3.0 * e
    queries = torch.cat([u.expand(1, 2, t, d), e.expand(1, 2, la, d)], dim=2) * 4.0  # 2 query heads per KV head
    valid = torch.ones(1, t, dtype=torch.bool)
    keep = math.ceil(0.25 * t)
    spec_scores = SpecKV(window=4).on_prefill(PrefillContext(0, 1, keys, keys, queries, valid))
    snap_scores = SnapKV(window=4).on_prefill(PrefillContext(0, 1, keys, keys, queries[:, :, :t], valid))
    assert 5 in spec_scores[0, 0].topk(keep).indices.tolist()
    assert 5 not in snap_scores[0, 0].topk(keep).indices.tolist()
    # Without lookahead queries SpecKV is SnapKV's vote (max pooling, window kept).
    same = SpecKV(window=4).on_prefill(PrefillContext(0, 1, keys, keys, queries[:, :, :t], valid))
    torch.testing.assert_close(same, snap_scores)


@torch.inference_mode()
def test_composes_with_kivi_and_stores_less(target: Transformer) -> None:
    n = 96
    ids, pos = prompt(n, 2), torch.arange(n)[None]
    sizes = {}
    for spec in ("speckv:budget=0.5,window=4", "speckv:budget=0.5,window=4+kivi:bits=2,residual=8,group=8"):
        cache = cache_for(spec, target, n)
        logits = prefill_with_lookahead(parse_kv_spec(spec), target, ids, pos, cache)
        greedy_decode(target, cache, logits, n, 4)
        assert cache.slots(0) == n // 2 + 4 and torch.isfinite(logits).all()
        sizes[spec] = cache.nbytes()
    small, big = sorted(sizes.values())
    assert small < 0.5 * big


@torch.inference_mode()
def test_left_padded_rows_match_each_prompt_alone(target: Transformer) -> None:
    spec = parse_kv_spec("speckv:budget=0.5,window=4,lookahead=5")
    a, b = prompt(48, 3)[0], prompt(40, 4)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(8, dtype=torch.long), b])])
    pos = (torch.arange(48)[None] - torch.tensor([[0], [8]])).clamp(min=0)
    batch = prefill_with_lookahead(spec, target, ids, pos, cache_for(str(spec), target, 48, [0, 8]), [0, 8])
    for row, p in ((0, a), (1, b)):
        n = p.shape[0]
        alone = prefill_with_lookahead(spec, target, p[None], torch.arange(n)[None], cache_for(str(spec), target, n))
        torch.testing.assert_close(batch[row], alone[0], rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_draft_lookahead_scores_and_specpc_selection(target: Transformer) -> None:
    ids = prompt(64, 5)[0].tolist()
    draft = make_model(num_layers=1, std=0.08)
    toks, scores = draft_lookahead(draft, torch.float32, torch.tensor([ids]), torch.arange(64)[None], None, 4, 97,
                                   window=8)
    assert toks.shape == (1, 4) and scores is not None and scores.shape == (1, 64)
    _, window_only = draft_lookahead(draft, torch.float32, torch.tensor([ids]), torch.arange(64)[None], None, 0,
                                     97, window=8)
    # 8 window queries, 4 heads, 1 layer: each query's attention on the prompt sums to 1 per head; the 4
    # lookahead queries add their attention on the prompt (the rest of theirs is on the lookahead itself).
    assert window_only.sum().item() == pytest.approx(8 * 4, rel=1e-4)
    assert 8 * 4 < scores.sum().item() < 12 * 4
    kept = select_prompt_tokens("specpc:budget=0.25,window=4,lookahead=4", target, ids)
    assert len(kept) == 16 and kept[-4:] == ids[-4:]
    rest = iter(ids)
    assert all(tok in rest for tok in kept)  # a subsequence: the prompt's order is kept
    assert select_prompt_tokens("specpc:budget=1.0", target, ids) == ids


def test_llm_loads_the_draft_and_generates(tiny_models) -> None:
    path, draft = str(tiny_models.gguf("llama", "F32")), str(tiny_models.gguf("qwen2", "F32"))
    text = "the cat sat on the mat and the dog sat on the log " * 8
    plain = LLM(path, dtype="float32", device="cpu").generate(text, GREEDY)[0]
    for kv in (f"speckv:budget=0.25,window=4,draft={draft}", f"speckv:budget=0.25,window=4,draft={draft}+kivi:bits=2",
               f"specpc:budget=0.25,window=4,draft={draft}"):
        llm = LLM(path, dtype="float32", device="cpu", kv=kv)
        out = llm.generate(text, GREEDY)[0]
        assert len(out.token_ids) == GREEDY.max_tokens and llm.kv_draft is not None
        assert out.metrics["kv_cache_bytes"] < 0.5 * plain.metrics["kv_cache_bytes"], kv
    # Full budget: the same tokens as the plain cache, one prompt or several (a left-padded static batch).
    llm = LLM(path, dtype="float32", device="cpu", kv=f"speckv:budget=1.0,draft={draft}")
    prompts = [text, "x y z x y z x y z x y z x y z x y z"]
    ref = LLM(path, dtype="float32", device="cpu")
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [o.token_ids for o in ref.generate(prompts, GREEDY)]
    # SpecPC with spec=draft:... takes that draft (one model loaded, shared).
    both = LLM(path, dtype="float32", device="cpu", spec=f"draft:model={draft}:k=2", kv="specpc:budget=0.5")
    assert both.kv_draft is both.draft
    assert len(both.generate(text, GREEDY)[0].token_ids) == GREEDY.max_tokens


def test_missing_or_foreign_draft_is_one_clear_error(tiny_models) -> None:
    path = str(tiny_models.gguf("llama", "F32"))
    with pytest.raises(KVSpecError, match="speckv needs a draft model"):
        LLM(path, dtype="float32", device="cpu", kv="speckv:budget=0.25")
    with pytest.raises(SpecError, match="different vocabulary"):
        LLM(path, dtype="float32", device="cpu", kv="specpc:draft=default")
    with pytest.raises(KVSpecError, match="lookahead must be an integer >= 1"):
        parse_kv_spec("speckv:lookahead=0")
    with pytest.raises(KVSpecError, match="name different drafts"):
        LLM(path, dtype="float32", device="cpu", kv="speckv:draft=a+specpc:draft=b")


@pytest.mark.slow
@pytest.mark.parametrize("depth", [0.2, 0.5, 0.8])
def test_specpc_keeps_the_passkey_needle_on_the_default_model(depth: float) -> None:
    """SmolLM2-135M as its own draft, a 1k-token prose haystack: the top quarter of the prompt by the draft's
    attention holds the whole needle sentence (the tokens a passkey answer needs)."""
    from frugallm.lab import passkey

    llm = LLM("default", dtype="float32", device="cpu", kv="specpc:budget=0.25,draft=default")
    stack = passkey.haystack("prose", None)
    p = passkey.make_prompt(llm.tokenizer, 1024, depth, "48213", sentences=stack.units, start=3, sep=stack.sep)
    kept = select_prompt_tokens(llm.kv_spec, llm.model, p.ids)
    assert len(kept) == math.ceil(0.25 * len(p.ids))
    assert "The pass key is 48213. Remember it." in llm.tokenizer.decode(kept)


def test_quality_decode_path_runs_the_lookahead(tiny_models, monkeypatch) -> None:
    """``eval --kv speckv`` / ``bench --kv speckv`` score through ``lab.quality.decode_scorer``: its prefill must be
    SpecKV's (with the draft's lookahead), and at budget 1 it reproduces the plain model's rows."""
    from frugallm.kv import speckv
    from frugallm.lab import quality

    path, draft = str(tiny_models.gguf("llama", "F32")), str(tiny_models.gguf("qwen2", "F32"))
    plain = LLM(path, dtype="float32", device="cpu")
    llm = LLM(path, dtype="float32", device="cpu", kv=f"speckv:budget=1.0,window=4,draft={draft}")
    calls = []
    real = speckv.draft_lookahead
    monkeypatch.setattr(speckv, "draft_lookahead", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    ids = plain.tokenizer.encode("the cat sat on the mat and the dog sat on the log " * 4)[:40]
    got = quality.decode_scorer(llm)(ids)
    assert calls == [16]  # one lookahead of the default 16 tokens, in the prefill
    torch.testing.assert_close(got[:-1], quality.decode_scorer(plain)(ids)[:-1], rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_lookahead_fits_the_context(target: Transformer) -> None:
    """A prompt at the end of the context window gets a shorter lookahead (none at the very end); a draft whose
    context is shorter than the prompt is a clear error."""
    spec = parse_kv_spec("speckv:budget=0.5,window=4,lookahead=16")
    n = 510  # max_position_embeddings 512: room for one lookahead token
    ids, pos = prompt(n, 6), torch.arange(n)[None]
    full = cache_for("full", target, n)
    ref = target(ids, pos, full, "last")
    cache = cache_for(str(spec), target, n)
    torch.testing.assert_close(prefill_with_lookahead(spec, target, ids, pos, cache), ref, rtol=1e-4, atol=1e-4)
    assert cache.slots(0) == n // 2
    short = make_model(num_layers=1, max_position_embeddings=64)
    with pytest.raises(KVSpecError, match="draft model's context"):
        draft_lookahead(short, torch.float32, prompt(80), torch.arange(80)[None], None, 4, 97)
