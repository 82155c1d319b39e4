"""KV-cache policies on a tiny random model: one matrix over every policy (alone and with KIVI) + invariants."""

from __future__ import annotations

import math

import pytest
import torch

from frugallm.errors import FrugalError
from frugallm.kv import (
    KV_POLICIES,
    CompressedKVCache,
    KVSpecError,
    build_kv_cache,
    parse_kv_spec,
    select_prompt_tokens,
)
from frugallm.model.kv_cache import ContiguousKVCache
from frugallm.model.llama import Transformer
from frugallm.model.ops import apply_rope
from kv_inputs import drive, make_model, synthetic

KIVI = "kivi:bits=2,residual=8,group=8"
ALONE = [
    KIVI,
    "kivi:bits=4,residual=0,group=4",
    "xquant:bits=4",
    "xquant:bits=2,residual=4,group=16",
    "streamingllm:sinks=2,window=20",
    "streamingllm:budget=0.25,positions=original",
    "h2o:budget=0.25",
    "snapkv:budget=0.25,window=8",
    "think:ratio=0.5,window=8",
    "lacache:budget=0.3",
    "gemfilter:budget=0.5,layer=1",
]
COMPOSED = [f"{s}+{KIVI}" for s in ALONE if not parse_kv_spec(s).quantizer] + [
    f"snapkv:budget=0.25,window=8+think:ratio=0.5,window=8+{KIVI}", "gemfilter:budget=0.5+snapkv:budget=0.5"]
PROMPT, STEPS, PADS = 48, 20, [0, 5]




pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model()


def left_padded(ids: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """Positions ``[B, T]`` for rows whose first ``pads[b]`` tokens are padding."""
    return (torch.arange(ids.shape[1])[None] - torch.tensor(pads)[:, None]).clamp(min=0)


def reference_step(model: Transformer, cache: CompressedKVCache, token: torch.Tensor, pos: torch.Tensor):
    """Logits of one decode step over a plain cache holding ``cache.dequantized()`` (keys rotated for ``pos``)."""
    cfg = model.config
    pads = {tuple(cache.padding(layer).tolist()) for layer in range(cfg.num_layers)}
    assert len(pads) == 1, "layers disagree on padding"
    n_max = max(cache.slots(layer) for layer in range(cfg.num_layers))
    ref = ContiguousKVCache(cfg.num_layers, token.shape[0], cfg.num_kv_heads, cfg.head_dim, n_max + 1,
                            torch.float32, "cpu", list(pads.pop()))
    cos_t, sin_t = model.rope_tables(torch.device("cpu"))
    for layer in range(cfg.num_layers):
        k, v = cache.dequantized(layer)
        n = k.shape[2]
        if cache.frame == "raw":  # stored unrotated: rotate by slot so the newest slot sits right before pos
            p = (pos - n + torch.arange(n)[None]).clamp(min=0)
            k = apply_rope(k, cos_t[p].unsqueeze(1), sin_t[p].unsqueeze(1))
        ref.k[layer][:, :, :n], ref.v[layer][:, :, :n] = k, v
        ref.lengths[layer] = n
    return model(token, pos, ref, "last")


def run_policy(model, spec, ids, pads, steps, *, check_reference=True, prompt=PROMPT):
    """Prefill ``ids[:, :prompt]`` then teacher-force ``steps`` tokens; returns (logits [B, steps+1, V], cache)."""
    b, n = ids.shape[0], prompt
    prompt = ids[:, :n]
    cache = build_kv_cache(spec, model, batch=b, capacity=n + steps, dtype=torch.float32, device="cpu",
                           pad_lens=pads if any(pads) else None)
    pos = left_padded(prompt, pads)
    with torch.inference_mode():
        out = [model(prompt, pos, cache, "last")]
        nxt = pos[:, -1:] + 1
        for i in range(steps):
            tok = ids[:, n + i:n + i + 1]
            if check_reference and isinstance(cache, CompressedKVCache):
                expected = reference_step(model, cache, tok, nxt)
            logits = model(tok, nxt, cache, "last")
            if check_reference and isinstance(cache, CompressedKVCache):
                torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
            out.append(logits)
            nxt = nxt + 1
    return torch.stack(out, 1), cache


def full_cache_logits(model, ids, pads, steps):
    return run_policy(model, "full", ids, pads, steps)[0]


@pytest.mark.parametrize("spec", ALONE + COMPOSED)
def test_policy_matrix(model, spec):
    """Every policy, alone and composed with KIVI: prefill + 20 decode steps, batch 2 with left padding.

    At every step the logits equal those of a plain cache loaded with the compressed cache's dequantized
    copy; evictors respect their budget; every compressing spec stores fewer bytes than the full cache.
    """
    parsed = parse_kv_spec(spec)
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, PROMPT + STEPS))
    prompt = PROMPT
    if parsed.selector is not None:  # prompt selection works on one prompt at a time
        kept = select_prompt_tokens(spec, model, ids[0, :PROMPT].tolist())
        prompt = len(kept)
        assert prompt == math.ceil(parsed.selector.budget * PROMPT)
        ids = torch.cat([torch.tensor(kept), ids[0, PROMPT:]])[None]
        logits, cache = run_policy(model, spec, ids, [0], STEPS, prompt=prompt)
    else:
        logits, cache = run_policy(model, spec, ids, PADS, STEPS)
        full = full_cache_logits(model, ids, PADS, STEPS)
        assert (logits.argmax(-1) == full.argmax(-1)).float().mean() >= 0.5  # sane, not garbage
    assert torch.isfinite(logits).all()
    if not parsed.compresses_cache:
        assert isinstance(cache, ContiguousKVCache)
        return
    assert isinstance(cache, CompressedKVCache)
    ev = parsed.evictor
    for layer in range(model.config.num_layers):
        slots = cache.slots(layer)
        if ev is None:
            assert slots == prompt + STEPS
            continue
        window = max(getattr(ev, "window", 0) or 0, getattr(ev, "sinks", 0))
        bound = math.ceil(ev.budget * prompt) + window if ev.budget is not None else ev.size
        if ev.evicts_during_decode:
            kivi_window = 8 + 8 if parsed.quantizer is not None else 0  # residual + group stay exact
            assert slots <= max(bound, kivi_window)
        else:
            assert slots <= bound + STEPS
    full_bytes = 2 * 2 * model.config.num_kv_heads * model.config.head_dim * (prompt + STEPS) * 4 * 2
    assert cache.nbytes() < full_bytes


@pytest.mark.parametrize("spec", ["snapkv:budget=1", "kivi:residual=1000", "streamingllm:window=1000",
                                  "think:ratio=0", "xquant:residual=1000"])
def test_lossless_settings_match_full_cache(model, spec):
    """Settings that keep everything exact (full budget, residual past the sequence) reproduce the full cache,
    with left padding and with keys re-rotated by slot (streamingllm positions=cache)."""
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, PROMPT + 8))
    logits, _ = run_policy(model, spec, ids, PADS, 8, check_reference=False)
    torch.testing.assert_close(logits, full_cache_logits(model, ids, PADS, 8), atol=1e-4, rtol=1e-4)


def test_xquant_rematerializes_bias_and_qk_norm():
    """XQuant rebuilds K through the q/k/v bias and the qk-norm (qwen2/qwen3 style) exactly."""
    model = make_model(arch="qwen3", qk_norm=True, attention_bias=True)
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (1, PROMPT + 6))
    exact, _ = run_policy(model, "xquant:residual=0,bits=8", ids, [0], 6)
    torch.testing.assert_close(exact, full_cache_logits(model, ids, [0], 6), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("spec", ["h2o:budget=0.25", "snapkv:budget=0.25,window=8", "lacache:budget=0.3",
                                  "streamingllm:sinks=2,window=20", KIVI, "xquant:bits=2,group=8",
                                  f"h2o:budget=0.25+{KIVI}", f"think:ratio=0.5,window=8+{KIVI}"])
def test_batch_rows_are_independent(model, spec):
    """Each row of a batch is compressed on its own: batched logits equal the rows run one at a time."""
    torch.manual_seed(4)
    ids = torch.randint(3, 97, (3, PROMPT + 12))
    batched, _ = run_policy(model, spec, ids, [0, 0, 0], 12, check_reference=False)
    for row in range(3):
        alone, _ = run_policy(model, spec, ids[row:row + 1], [0], 12, check_reference=False)
        torch.testing.assert_close(batched[row:row + 1], alone, atol=1e-4, rtol=1e-4)


# -- invariants on synthetic keys -------------------------------------------------------------------------------






@pytest.mark.parametrize("spec", ["h2o:budget=0.1", "snapkv:budget=0.1,window=4"])
def test_heavy_hitter_survives(model, spec):
    """A token every query attends to strongly is kept by attention-score evictors, in every head."""
    n, star = 200, 37
    k, v, q, x, pos = synthetic(n)
    u = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(9)), dim=0) * 4
    q += u  # every query shares a direction ...
    k[:, :, star] = 2 * u  # ... that this key is aligned with
    v[:, :, star] = 123.0
    cache = build_kv_cache(spec, model, batch=1, capacity=n, dtype=torch.float32, device="cpu")
    drive(cache, [(k, v, q, x, pos)])
    for step in range(10):  # and it keeps surviving decode-time eviction
        kk, vv, qq, xx, pp = synthetic(1, seed=10 + step, start=n + step)
        qq += u
        drive(cache, [(kk, vv, qq, xx, pp)])
    for layer in range(2):
        _, values = cache.dequantized(layer)
        assert cache.slots(layer) <= math.ceil(parse_kv_spec(spec).evictor.budget * n) + 4 + 10
        assert ((values == 123.0).all(-1).sum(-1) == 1).all(), "heavy hitter evicted from some head"


def test_kivi_residual_window_is_exact_and_error_bounded(model):
    r, g, n = 16, 8, 150
    k, v, q, x, pos = synthetic(n, seed=4)
    # Plain KIVI (no sinks, min/max ranges, unrotated fp16 metadata): the half-step error bound below holds.
    cache = build_kv_cache(f"kivi:bits=2,residual={r},group={g},sinks=0,clip=1,rotate=0,scales=fp16", model,
                           batch=1, capacity=n, dtype=torch.float32, device="cpu")
    drive(cache, [(k[:, :, :100], v[:, :, :100], q[:, :, :100], x[:, :100], pos[:, :100])])
    for i in range(100, n):
        drive(cache, [(k[:, :, i:i + 1], v[:, :, i:i + 1], q[:, :, i:i + 1], x[:, i:i + 1], pos[:, i:i + 1])])
    dk, dv = cache.dequantized(0)
    assert dk.shape[2] == n
    assert torch.equal(dk[:, :, -r:], k[:, :, -r:]) and torch.equal(dv[:, :, -r:], v[:, :, -r:])
    store = cache.layers[0].store
    nq = store.num_quantized
    assert n - nq == r and nq > 0  # exactly the window is exact: key groups are encoded as tokens leave it
    assert not torch.equal(dk[:, :, :nq], k[:, :, :nq])  # really quantized
    # Asymmetric 2-bit: error <= half a step, step = range / 3 per key channel group / value token group.
    nk = -(-nq // g) * g  # a group's range covers all its tokens, including those still in the window
    kr = k[:, :, :nk].reshape(1, 2, nk // g, g, 16)
    kstep = ((kr.amax(3, keepdim=True) - kr.amin(3, keepdim=True)) / 3).expand(kr.shape).reshape(1, 2, nk, 16)
    assert ((dk[:, :, :nq] - k[:, :, :nq]).abs() <= kstep[:, :, :nq] / 2 + 2e-3 * kstep[:, :, :nq] + 1e-3).all()
    vr = v[:, :, :nq]
    vstep = (vr.amax(-1, keepdim=True) - vr.amin(-1, keepdim=True)) / 3
    assert ((dv[:, :, :nq] - vr).abs() <= vstep / 2 + 2e-3 * vstep + 1e-3).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 16])
def test_pack_roundtrip(bits, n):
    from frugallm.kv.quantize import pack, unpack

    codes = torch.randint(0, 1 << bits, (3, n), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), codes)


def kv_model(head_dim=64, kv_heads=3):
    return make_model(hidden_size=192, num_heads=3, num_kv_heads=kv_heads, head_dim=head_dim, num_layers=1)


def test_kivi2_bytes_below_a_fifth_of_fp16():
    """KIVI-2 (residual 0, group 32) on head_dim 64 keys/values: <= 0.2x the fp16 cache for long sequences."""
    m = kv_model()
    n = 2048
    k, v, q, x, pos = synthetic(n, hk=3, hq=3, d=64, hidden=192, dtype=torch.float16, seed=5)
    full = build_kv_cache("full", m, batch=1, capacity=n, dtype=torch.float16, device="cpu")
    kivi2 = build_kv_cache("kivi:bits=2,residual=0", m, batch=1, capacity=n, dtype=torch.float16, device="cpu")
    kivi4 = build_kv_cache("kivi:bits=4,residual=0", m, batch=1, capacity=n, dtype=torch.float16, device="cpu")
    for c in (full, kivi2, kivi4):
        drive(c, [(k, v, q, x, pos)], num_layers=1)
    assert kivi2.nbytes() <= 0.2 * full.nbytes()
    assert kivi4.nbytes() <= 0.32 * full.nbytes()


@pytest.mark.parametrize("spec", ["h2o:budget=0.25", "snapkv:budget=0.25", "streamingllm:budget=0.25",
                                  "lacache:budget=0.25", "h2o:budget=0.25+xquant:bits=4"])
def test_evictors_at_quarter_budget_store_under_30_percent(model, spec):
    n, steps = 400, 20
    torch.manual_seed(6)
    ids = torch.randint(3, 97, (1, n + steps))
    caches = {}
    for s in ("full", spec):
        cache = build_kv_cache(s, model, batch=1, capacity=n + steps, dtype=torch.float32, device="cpu")
        with torch.inference_mode():
            model(ids[:, :n], torch.arange(n)[None], cache, "last")
            for i in range(steps):
                model(ids[:, n + i:n + i + 1], torch.tensor([[n + i]]), cache, "last")
        caches[s] = cache
    assert caches[spec].nbytes() <= 0.3 * caches["full"].nbytes()
    assert caches[spec].reserved_bytes() < caches["full"].reserved_bytes()


def test_lacache_bands_form_a_ladder():
    ev = parse_kv_spec("lacache:budget=0.25,sinks=2,recent=0.25").evictor
    valid = torch.ones(1, 100, dtype=torch.bool)
    kept = []
    for layer in range(4):
        scores = ev.ladder(valid, 25, layer, 4, heads=1)
        kept.append(scores[0, 0].topk(25).indices.sort().values)
    starts = [int(k[2]) for k in kept]  # first slot after the 2 sinks
    assert starts == sorted(starts) and starts[0] == 2 and starts[-1] > starts[1]
    for k in kept:
        assert k[:2].tolist() == [0, 1] and k[-6:].tolist() == list(range(94, 100))


def test_think_keeps_the_query_relevant_channels(model):
    """Prompt keys before the window keep the channels the queries read; the window and new keys stay whole."""
    k, v, q, x, pos = synthetic(64)
    q[..., 3] *= 20.0  # every query leans on channel 3
    k[..., 5] *= 20.0  # big keys on channel 5, but no query reads it
    q[..., 5] = 0.0
    cache = build_kv_cache("think:ratio=0.75,window=16", model, batch=1, capacity=80, dtype=torch.float32,
                           device="cpu")
    drive(cache, [(k, v, q, x, pos)])
    drive(cache, [synthetic(1, seed=7, start=64)])
    st = cache.layers[0]
    assert st.channels.shape == (1, 2, 4)
    assert (st.channels == 3).any(-1).all() and not (st.channels == 5).any()
    assert st.pruned.k.shape[3] == 4 and st.pruned.num_slots == 48  # stored reduced
    keys, values = cache.dequantized(0)
    assert keys.shape == (1, 2, 65, 16) and cache.slots(0) == 65
    assert (keys[:, :, :48, 5] == 0).all() and torch.equal(keys[:, :, 48:64], k[:, :, 48:])
    assert torch.equal(values[:, :, :64], v)


def test_gemfilter_selects_in_order_and_keeps_the_tail(model):
    ids = list(range(3, 83))
    kept = select_prompt_tokens("gemfilter:budget=0.25,window=4", model, ids)
    assert len(kept) == 20 and kept == sorted(kept) and kept[-4:] == ids[-4:]
    assert select_prompt_tokens("snapkv", model, ids) is None
    assert isinstance(build_kv_cache("gemfilter", model, batch=1, capacity=8, dtype=torch.float32, device="cpu"),
                      ContiguousKVCache)
    with pytest.raises(FrugalError, match="below the model's 2 layers"):
        select_prompt_tokens("gemfilter:layer=5", model, ids)


@pytest.mark.parametrize(("spec", "message"), [
    ("magic", "valid choices: gemfilter, h2o, kivi, lacache, snapkv, speckv, specpc, streamingllm, think, xquant"),
    ("kivi:bits=3", "bits must be 2 or 4"),
    ("kivi+xquant:bits=4", "both quantizers"),
    ("h2o+snapkv", "both eviction policies"),
    ("snapkv:budget=0", r"budget must be in \(0, 1\]"),
    ("h2o:budget=1.5", r"budget must be in \(0, 1\]"),
    ("snapkv:budget=lots", "must be a number"),
    ("snapkv:windw=4", "no parameter 'windw'; valid: budget, kernel, pooling, window"),
    ("snapkv:window", "expected param=value"),
    ("snapkv++kivi", "empty policy"),
    ("xquant+think", "stores the layer input X"),
    ("streamingllm+think", "evicts during decoding"),
    ("h2o+think", "compose think with snapkv"),
    ("streamingllm:window=8,budget=0.5", "not both"),
    ("think:ratio=1", r"ratio must be in \[0, 1\)"),
    ("kivi:scales=fp4", "scales must be fp8 or fp16"),
    ("kivi:clip=0", r"clip must be in \[0.05, 1\]"),
    ("kivi:rotate=2", "rotate must be 0 or 1"),
    ("kivi:vgroup=0", "vgroup must be an integer >= 1"),
    ("kivi:sinks=-1", "sinks must be an integer >= 0"),
])
def test_bad_specs(spec, message):
    with pytest.raises(KVSpecError, match=message):
        parse_kv_spec(spec)


def test_spec_round_trip_and_registry():
    spec = parse_kv_spec("SnapKV:budget=0.1 + kivi:bits=4,residual=64")
    assert str(spec) == "snapkv:budget=0.1+kivi:bits=4,residual=64"
    assert parse_kv_spec(str(spec)) == spec
    assert str(parse_kv_spec("full")) == "full" and parse_kv_spec("") == parse_kv_spec("none")
    assert set(KV_POLICIES.names()) == {"gemfilter", "h2o", "kivi", "lacache", "snapkv", "specpc", "speckv",
                                        "streamingllm", "think", "xquant"}
    flags = {n: KV_POLICIES.get(n)() for n in KV_POLICIES.names()}
    assert [n for n, p in flags.items() if p.quantizes] == ["kivi", "xquant"]
    assert flags["streamingllm"].changes_positions and flags["h2o"].needs_scores
    assert flags["gemfilter"].selects_prompt and flags["think"].prunes_channels


@pytest.mark.parametrize("spec", ["snapkv:budget=0.5", "kivi:bits=2,residual=8,sinks=0"])
def test_half_storage_attends_in_fp32(model, spec):
    """``store_dtype=float16``: exact slots stored in half (half the bytes), attention still gets fp32, and
    for keys/values that are fp16 values to begin with the result equals the fp32-stored cache's."""
    k, v, q, x, pos = synthetic(40)
    k, v, q, x = (t.half().float() for t in (k, v, q, x))  # fp16-representable, as half activations are
    full = build_kv_cache(spec, model, batch=1, capacity=64, dtype=torch.float32, device="cpu")
    half = build_kv_cache(spec, model, batch=1, capacity=64, dtype=torch.float32, device="cpu",
                          store_dtype=torch.float16)
    chunks = [(k, v, q, x, pos)]
    for i in range(3):  # decode steps
        kd, vd, qd, xd, pd = synthetic(1, seed=10 + i, start=40 + i)
        chunks.append(tuple(t.half().float() for t in (kd, vd, qd, xd)) + (pd,))
    for c in chunks:
        a, b = drive(full, [c]), drive(half, [c])
    assert b[0].dtype == torch.float32 and b[1].dtype == torch.float32
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(b[1], a[1], rtol=0, atol=1e-6)
    assert half.nbytes() < full.nbytes()
    if spec.startswith("snapkv"):
        assert half.nbytes() * 2 == full.nbytes()
