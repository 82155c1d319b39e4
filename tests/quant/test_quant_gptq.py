"""GPTQ: error feedback beats round-to-nearest on correlated inputs; the block-by-block model driver."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from frugallm.errors import FrugalError
from frugallm.quant import GroupQuantLinear, gptq_quantize_model, parse_quant_spec, quantize_model
from frugallm.quant.calibrate import collect_hessians
from frugallm.quant.gptq import gptq_quantize_weight
from frugallm.quant.groups import rtn_group_quantize
from quant_models import TinyLM


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().float() - ref.detach().float()).norm() / ref.detach().float().norm())


def correlated_sampler(k: int, gen: torch.Generator) -> Callable[[int], torch.Tensor]:
    """A distribution of rows ``[n, k]`` with strongly correlated features of very different scales (like
    LLM activations): a 16-dimensional subspace plus mixed noise. Calibration and test rows come from
    the same sampler."""
    basis = torch.randn(16, k, generator=gen)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + 0.3 * torch.eye(k)
    scale = torch.linspace(0.1, 3.0, k)

    def sample(n: int) -> torch.Tensor:
        return (torch.randn(n, 16, generator=gen) @ basis + 0.3 * torch.randn(n, k, generator=gen) @ mix) * scale

    return sample


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    k = 256
    w = torch.randn(96, k, generator=gen)
    sample = correlated_sampler(k, gen)
    x_cal, x_test = sample(2048), sample(512)  # same distribution, unseen test rows
    return w, x_cal, x_test


ORDERS = ["columns", "act_order", "act_order_dynamic"]  # the last: groups along the processing order


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, order: str, **kw) -> object:
    return gptq_quantize_weight(w, h, bits, 32, act_order=order != "columns",
                                static_groups=order != "act_order_dynamic", **kw)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn(problem: tuple, bits: int, order: str, symmetric: bool) -> None:
    w, x_cal, x_test = problem
    h = 2.0 * x_cal.t() @ x_cal / x_cal.shape[0]
    state = gptq(w, h, bits, order, symmetric=symmetric)
    # only groups along the processing order need the runtime to permute activations
    assert (state.perm is not None) == (order == "act_order_dynamic")
    rtn = rtn_group_quantize(w, bits, 32, symmetric)
    ref = x_test @ w.t()
    mod = GroupQuantLinear(state)
    err_gptq = rel_err(mod(x_test), ref)
    err_rtn = rel_err(GroupQuantLinear(rtn)(x_test), ref)
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)  # measured 0.08-0.37x
    # the runtime module undoes the act-order permutation: same result as the dequantized weight
    assert rel_err(mod(x_test), x_test @ mod.dequantize().t()) < 0.01


def test_act_order_helps_on_uneven_feature_scales(problem: tuple) -> None:
    w, x_cal, x_test = problem
    h = 2.0 * x_cal.t() @ x_cal / x_cal.shape[0]
    ref = x_test @ w.t()
    errs = [rel_err(GroupQuantLinear(gptq(w, h, 3, order))(x_test), ref) for order in ORDERS]
    assert errs[1] < errs[0] and errs[2] < errs[0], errs


def test_gptq_handles_dead_inputs() -> None:
    gen = torch.Generator().manual_seed(1)
    x = correlated_sampler(64, gen)(512)
    x[:, 5] = 0.0  # a feature never active in calibration
    w = torch.randn(32, 64, generator=gen)
    state = gptq_quantize_weight(w, 2 * x.t() @ x / 512, 4, 32)
    assert torch.isfinite(state.dequantize()).all()


def test_gptq_block_must_hold_whole_groups() -> None:
    with pytest.raises(FrugalError, match="multiple of the group size"):
        gptq_quantize_weight(torch.randn(4, 128), torch.eye(128), 4, 128, block_size=96)


def gptq_lm(layers: int = 3) -> TinyLM:
    return TinyLM(vocab=128, h=64, inter=128, layers=layers, kv=64, tied=False)


def test_gptq_model_block_by_block() -> None:
    torch.manual_seed(0)
    base = gptq_lm().eval()
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randint(0, 128, (4, 32), generator=gen) for _ in range(4)]
    model = copy.deepcopy(base)
    calls = []

    def run_calib() -> None:
        calls.append(sum(isinstance(m, GroupQuantLinear) for m in model.modules()))
        for ids in calib:
            model(ids)

    quantize_model(model, "gptq:bits=4:group=32:head", calib=run_calib)
    # one pass per block (+1 for lm_head); each pass sees the blocks quantized before it
    assert calls == [0, 4, 8, 12]
    assert all(isinstance(m, GroupQuantLinear) for b in model.layers for m in b.children())
    assert isinstance(model.lm_head, GroupQuantLinear)
    rtn = quantize_model(copy.deepcopy(base), "int4:group=32:head")
    test_ids = torch.cat(calib)  # in-distribution tokens
    with torch.no_grad():
        ref = base(test_ids)
        err_gptq, err_rtn = rel_err(model(test_ids), ref), rel_err(rtn(test_ids), ref)
    assert err_gptq < err_rtn < 0.1, (err_gptq, err_rtn)


def test_gptq_early_stop_gives_identical_weights_with_less_compute() -> None:
    """A run_calib that stops each batch after the block being calibrated gets the same Hessians."""
    import contextlib

    from frugallm.quant.calibrate import StopCalibration

    torch.manual_seed(0)
    base = gptq_lm(layers=4).eval()
    calib = [torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results, layer_calls = [], []
    for early in (False, True):
        model = copy.deepcopy(base)
        calls = [0]
        model.layers[-1].register_forward_pre_hook(lambda *a, c=calls: c.__setitem__(0, c[0] + 1))

        def run_calib(model=model, early=early) -> None:
            for ids in calib:
                if early:
                    with contextlib.suppress(StopCalibration):
                        model(ids)
                else:
                    model(ids)

        run_calib.stops_early = early  # type: ignore[attr-defined]
        quantize_model(model, "gptq:bits=4:group=32:head", calib=run_calib)
        results.append(model.state_dict())
        layer_calls.append(calls[0])
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    # the last block runs in every pass without early stop, only in its own pass and the head's with it
    assert layer_calls == [5 * len(calib), 2 * len(calib)]


def test_gptq_model_errors() -> None:
    model = gptq_lm(layers=2)
    with pytest.raises(FrugalError, match="use quantize_model"):
        gptq_quantize_model(model, "int4", lambda: None)
    with pytest.raises(FrugalError, match="calibration never reached"):
        gptq_quantize_model(model, parse_quant_spec("gptq:bits=4:group=32"), lambda: None)


def test_collect_hessians_matches_definition() -> None:
    lin = nn.Linear(16, 4)
    xs = [torch.randn(3, 5, 16) for _ in range(2)]

    def run() -> None:
        for x in xs:
            lin(x)

    (h,) = collect_hessians([lin], run)
    x = torch.cat([x.reshape(-1, 16) for x in xs])
    assert torch.allclose(h, 2 * x.t() @ x / x.shape[0], atol=1e-5)


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, order: str) -> torch.Tensor:
    """The paper's update written out without its tricks: an explicit inverse Hessian from which each
    quantized column is eliminated (OBS, Eq. 3), one column at a time. Group scales/offsets come from the
    error-updated weights when a group starts or, for static groups under act-order, from the original
    weights of each input-feature group. Returns the dequantized weight in original column order."""
    w, h = w.double().clone(), h.double().clone()
    k = w.shape[1]

    def params(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = block.amin(1), block.amax(1)
        return ((hi - lo) / (2**bits - 1)).to(torch.float16).double(), lo.to(torch.float16).double()

    static = [params(w[:, j : j + group]) for j in range(0, k, group)]
    perm = torch.argsort(torch.diag(h), descending=True) if order != "columns" else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += 0.01 * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    for i in range(k):
        if order == "act_order":
            s, m = static[int(perm[i]) // group]
        elif i % group == 0:
            s, m = params(w[:, i : i + group])
        q = torch.round((w[:, i] - m) / s).clamp(0, 2**bits - 1) * s + m
        out[:, i] = q
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return out[:, torch.argsort(perm)].float()


@pytest.mark.parametrize("order", ORDERS)
def test_gptq_matches_the_papers_update(problem: tuple, order: str) -> None:
    # Cholesky of the inverse Hessian + lazy batch updates are exact rewrites of the plain OBS update: the
    # same codes, whatever the block size.
    w, x_cal, _ = problem
    w = w[:24]
    h = 2.0 * x_cal.t() @ x_cal / x_cal.shape[0]
    ref = reference_gptq(w, h, 4, 32, order)
    for block_size in (32, 128, 256):
        deq = GroupQuantLinear(gptq(w, h, 4, order, block_size=block_size)).dequantize()
        same = float(((deq - ref).abs() < 1e-3 * ref.abs().amax()).float().mean())
        assert same > 0.995, (block_size, same)  # ties may round apart in float32


def test_llm_calibration_is_disjoint_from_quality_windows(tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    # Quality evaluation (lab/quality.py, benchmarks/quant_bench.py) scores windows from the start of the
    # built-in corpus; GPTQ must not calibrate on those tokens.
    from frugallm import LLM
    from frugallm.corpus import builtin_corpus
    from frugallm.lab import quality

    seen: list[list[int]] = []
    score = LLM.score

    def recording_score(self: LLM, token_ids: list[int]) -> torch.Tensor:
        seen.append(list(token_ids))
        return score(self, token_ids)

    monkeypatch.setattr(LLM, "score", recording_score)
    llm = LLM(str(tiny_models.gguf("llama", "F32")), dtype="float32", device="cpu", quant="gptq:bits=4:group=32")
    monkeypatch.undo()
    assert seen
    evaluated = [t for w in quality.corpus_windows(llm.tokenizer, builtin_corpus(), 16, 256) for t in w]

    def grams(ids: list[int], n: int = 64) -> set[tuple[int, ...]]:
        return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}

    calib = set().union(*(grams(w) for w in seen))
    assert not calib & grams(evaluated)


def test_static_groups_keep_a_source_grid(problem: tuple) -> None:
    # Weights already on a 4-bit grid at the same group size (a Q4 GGUF source): round-to-nearest is
    # lossless, and so is act-order with static groups (no rounding error to feed back), while groups along
    # the processing order mix source groups and lose the grid.
    _, x_cal, _ = problem
    gen = torch.Generator().manual_seed(3)
    n, k = 32, x_cal.shape[1]
    scales = (torch.rand(n, k // 32, 1, generator=gen) * 0.1 + 0.01).half().float()
    offsets = (-8 * scales + torch.randn(n, k // 32, 1, generator=gen) * 0.01).half().float()
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans the whole grid, so min/max recover it
    w = (codes * scales + offsets).reshape(n, k)
    h = 2.0 * x_cal.t() @ x_cal / x_cal.shape[0]
    assert torch.equal(rtn_group_quantize(w, 4, 32).dequantize(), w)
    assert torch.equal(GroupQuantLinear(gptq(w, h, 4, "act_order")).dequantize(), w)
    assert rel_err(GroupQuantLinear(gptq(w, h, 4, "act_order_dynamic")).dequantize(), w) > 0.01
