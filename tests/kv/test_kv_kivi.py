"""KIVI's storage invariants and quality options on synthetic keys/values (no model forward needed).

Exact sinks and window, streaming == one-shot quantization, eviction that never changes kept tokens,
range clipping, Hadamard-rotated values, fp8 metadata and the 2-bit bytes budget.
"""

from __future__ import annotations

import pytest
import torch

from frugallm.kv import build_kv_cache, parse_kv_spec
from frugallm.kv.quantize import FP8, QuantizedSequence, hadamard, quantize
from kv_inputs import drive, make_model, synthetic

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def kivi_seqs(channels=16, **kw):
    """The key and value sequences exactly as the default KIVI store builds them (fp8 metadata)."""
    base = dict(bits=2, residual=16, flush=1, sinks=4, clip=0.6, dtype=torch.float32, device=CPU, scale_dtype=FP8)
    base.update(kw)
    k = QuantizedSequence((1, 2), channels, axis="channel", group=8, **base)
    v = QuantizedSequence((1, 2), channels, axis="token", group=channels, zero_dtype=FP8, rotate=True, **base)
    return k, v


def test_defaults_keep_sinks_and_exactly_the_window_exact():
    model = make_model()
    r, n = 16, 150
    k, v, q, x, pos = synthetic(n, seed=4)
    cache = build_kv_cache(f"kivi:residual={r},group=8", model, batch=1, capacity=n, dtype=torch.float32, device="cpu")
    drive(cache, [(k[:, :, :100], v[:, :, :100], q[:, :, :100], x[:, :100], pos[:, :100])])
    for i in range(100, n):
        drive(cache, [(k[:, :, i:i + 1], v[:, :, i:i + 1], q[:, :, i:i + 1], x[:, i:i + 1], pos[:, i:i + 1])])
    dk, dv = cache.dequantized(0)
    store = cache.layers[0].store
    sinks = parse_kv_spec("kivi").quantizer.sinks
    assert dk.shape[2] == n and store.pinned == sinks and store.protected == r
    assert store.num_quantized == n - r - sinks  # no extra tokens wait for a key group to fill
    assert torch.equal(dk[:, :, :sinks], k[:, :, :sinks]) and torch.equal(dv[:, :, :sinks], v[:, :, :sinks])
    assert torch.equal(dk[:, :, -r:], k[:, :, -r:]) and torch.equal(dv[:, :, -r:], v[:, :, -r:])
    mid = slice(sinks, n - r)
    assert not torch.equal(dk[:, :, mid], k[:, :, mid]) and not torch.equal(dv[:, :, mid], v[:, :, mid])
    # 2 bits is coarse, but the quantized tokens stay close: relative error well below 1.
    for got, ref in ((dk, k), (dv, v)):
        assert (got[:, :, mid] - ref[:, :, mid]).norm() / ref[:, :, mid].norm() < 0.6


@pytest.mark.parametrize("first", [1, 7, 40])
def test_streaming_equals_one_shot(first):
    """Tokens fed one at a time are stored exactly as when fed at once: a key group's (scale, zero) is
    computed from all its tokens (the later ones still in the window), whatever the arrival pattern."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 100, 16, generator=g) + torch.linspace(-3, 3, 16)  # per-channel offsets
    for i in (0, 1):  # both the key (per-channel) and the value (per-token, rotated) sequence
        a, b = kivi_seqs()[i], kivi_seqs()[i]
        a.append(x)
        b.append(x[:, :, :first])
        for t in range(first, 100):
            b.append(x[:, :, t:t + 1])
        assert a.num_quantized == b.num_quantized == 100 - 16 - 4
        assert torch.equal(a.materialize(), b.materialize())


def test_eviction_never_changes_kept_tokens():
    """Dropping quantized tokens while a key group is half encoded: the kept tokens, and the tokens of
    that group still waiting in the window, dequantize exactly as without the eviction."""
    x = torch.randn(1, 2, 90, 16, generator=torch.Generator().manual_seed(1))
    full, ev = kivi_seqs()[0], kivi_seqs()[0]
    for s in (full, ev):
        s.append(x[:, :, :63])
    assert ev.filled  # a group is open: some of its tokens are encoded, the rest still exact
    keep = torch.cat([torch.arange(4), torch.tensor([5, 9, 20, 40, 41, 42]), torch.arange(47, 63)])
    idx = torch.stack([keep, torch.cat([torch.arange(4), torch.tensor([4, 6, 30, 44, 45, 46]), torch.arange(47, 63)])])
    ev.gather(idx[None])
    for s in (full, ev):
        s.append(x[:, :, 63:90])
    kept = torch.cat([idx, torch.arange(63, 90).expand(2, 27)], dim=1)[None]
    expected = torch.gather(full.materialize(), 2, kept[..., None].expand(1, 2, kept.shape[2], 16))
    assert torch.equal(ev.materialize(), expected)
    assert ev.scale.shape[-2] < full.scale.shape[-2]  # groups nobody points to any more were freed


def test_clipping_never_increases_the_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=g) * torch.rand(64, 1, generator=g) * 4
    x[::7, 3] += 25.0  # a few outliers
    errs = []
    for clip in (1.0, 0.6):
        codes, scale, zero = quantize(x, 2, dim=-1, clip=clip)
        errs.append((codes.float() * scale.float() + zero.float() - x).square().sum(-1))
    assert (errs[1] <= errs[0] * (1 + 1e-6)).all()
    assert errs[1].sum() < 0.8 * errs[0].sum()


@pytest.mark.parametrize("n", [16, 64, 96])
def test_hadamard_is_orthonormal_and_symmetric(n):
    h = hadamard(n, CPU)
    assert torch.allclose(h @ h, torch.eye(n), atol=1e-6) and torch.equal(h, h.T)


def test_rotating_values_spreads_an_outlier_channel():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(1, 2, 200, 64, generator=g)
    v[..., 5] *= 12.0
    errs = []
    for rotate in (False, True):
        s = QuantizedSequence((1, 2), 64, 2, axis="token", group=64, residual=0, flush=1, dtype=torch.float32,
                              device=CPU, rotate=rotate)
        s.append(v)
        errs.append((s.materialize() - v).norm() / v.norm())
    assert errs[1] < 0.7 * errs[0]


def test_fp8_metadata_is_one_byte_and_saturates_instead_of_nan():
    k, v = kivi_seqs()
    big = torch.randn(1, 2, 80, 16, generator=torch.Generator().manual_seed(4)) * 3000.0
    k.append(big)
    v.append(big)
    assert k.scale.element_size() == 1 and k.zero.dtype == torch.float16  # key zeros carry bias-sized offsets
    assert v.scale.element_size() == v.zero.element_size() == 1
    assert torch.isfinite(k.materialize()).all() and torch.isfinite(v.materialize()).all()


def test_kivi2_defaults_under_a_fifth_of_fp16_at_2k():
    """The target setting: head_dim 64, window 128, 2047 tokens -> <= 0.2x an fp16 cache, sinks and window included."""
    m = make_model(hidden_size=128, num_heads=2, num_kv_heads=2, head_dim=64, num_layers=1)
    k, v, q, x, pos = synthetic(2047, hk=2, hq=2, d=64, hidden=128, dtype=torch.float16, seed=5)
    caches = {s: build_kv_cache(s, m, batch=1, capacity=2047, dtype=torch.float16, device="cpu")
              for s in ("full", "kivi:bits=2", "kivi:bits=4")}
    for c in caches.values():  # prompt then the rest: equivalent to token-by-token (see streaming test)
        drive(c, [(t[..., :1024, :] if t.dim() == 4 else t[:, :1024] for t in (k, v, q, x, pos))], num_layers=1)
        drive(c, [(t[..., 1024:, :] if t.dim() == 4 else t[:, 1024:] for t in (k, v, q, x, pos))], num_layers=1)
    full = caches["full"].nbytes()
    assert caches["kivi:bits=2"].nbytes() <= 0.2 * full
    assert caches["kivi:bits=4"].nbytes() <= 0.32 * full


def test_sinks_survive_decode_time_eviction():
    model = make_model()
    n = 120
    k, v, q, x, pos = synthetic(n, seed=6)
    k[:, :, :4] *= -5.0  # keys no query likes: H2O alone would drop them
    cache = build_kv_cache("h2o:budget=0.2+kivi:residual=8,group=8", model, batch=1, capacity=n + 30,
                           dtype=torch.float32, device="cpu")
    drive(cache, [(k, v, q, x, pos)])
    for step in range(30):
        drive(cache, [synthetic(1, seed=10 + step, start=n + step)])
    for layer in range(2):
        dk, dv = cache.dequantized(layer)
        assert cache.slots(layer) <= 24 + 4 + 8 + 1
        assert torch.equal(dk[:, :, :4], k[:, :, :4]) and torch.equal(dv[:, :, :4], v[:, :, :4])


def test_kivi_spec_round_trip():
    spec = parse_kv_spec("kivi:bits=2,group=32,vgroup=32,sinks=0,clip=1,rotate=0,scales=fp16")
    assert str(spec) == "kivi:group=32,vgroup=32,sinks=0,clip=1.0,rotate=0,scales=fp16"
    assert parse_kv_spec(str(spec)) == spec
