"""KV-policy quality through the generation path (prefill with the policy, then teacher-forced decode steps)."""

from __future__ import annotations

import pytest
import torch

from frugallm import LLM
from frugallm.corpus import builtin_corpus
from frugallm.errors import FrugalError
from frugallm.lab import quality

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = builtin_corpus()[:40_000]
KW = dict(corpus_text=TEXT, windows=2, window_len=64)


@pytest.fixture(scope="module")
def path(tiny_models):
    return str(tiny_models.hf("llama"))


@pytest.fixture(scope="module")
def plain(path):
    return LLM(path, dtype="float32", device="cpu")


def test_no_policy_path_is_score(plain) -> None:
    via_llm = quality.evaluate_llm(plain, model_key="np", make_reference=None, **KW)
    via_score = quality.evaluate(plain.score, plain.tokenizer, model_key="np", make_reference=None, **KW)
    assert via_llm == via_score and via_llm.path == quality.PREFILL_PATH
    # The decode path itself, with no policy, reproduces score's logits (prefill rows and decode-step rows).
    ids = plain.tokenizer.encode(TEXT[:2000])[:40]
    dec = quality.decode_scorer(plain)(ids)
    assert dec.shape == (40, plain.config.vocab_size)
    torch.testing.assert_close(dec[:-1], plain.score(ids)[:-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", ["kivi:bits=2,group=16,residual=16", "snapkv:budget=0.1,window=4"])
def test_lossy_policy_changes_quality(path, plain, kv) -> None:
    ref = quality.evaluate_llm(plain, model_key=f"ref-{kv}", make_reference=None, is_reference=True, **KW)
    llm = LLM(path, dtype="float32", device="cpu", kv=kv)
    q = quality.evaluate_llm(llm, model_key=f"ref-{kv}", make_reference=lambda: plain.score, **KW)
    s = quality.decode_split(64)
    assert q.decode_from == s == 32 and q.path.startswith("decode:") and q.predictions == ref.predictions
    assert q.perplexity != pytest.approx(ref.perplexity, rel=1e-4)  # score alone gave exactly the default's
    assert q.kl_divergence > 0 and q.decode_kl_divergence > q.kl_divergence  # the loss sits in the decode rows
    # score (one prefill pass) never runs the policy: the old measurement equals the default's.
    old = quality.evaluate(llm.score, llm.tokenizer, model_key=f"old-{kv}", make_reference=None, **KW)
    assert old.perplexity == pytest.approx(ref.perplexity, rel=1e-6)


def test_decode_split_bounds() -> None:
    assert quality.decode_split(2) == 1 and quality.decode_split(256) == 128 and quality.decode_split(10, 0.99) == 9
    with pytest.raises(FrugalError, match="decode_from"):
        quality.decode_split(64, 1.0)


def test_eval_cli_kv_runs_the_decode_path(path, capsys) -> None:
    import json

    from frugallm.cli import main

    args = ["eval", path, "--dtype", "float32", "--device", "cpu", "--task", "ppl", "--windows", "1",
            "--window-len", "48", "--json"]
    assert main([*args, "--kv", "snapkv:budget=0.1,window=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"].startswith("decode:") and out["decode_from"] == 24 and out["decode_kl_divergence"] > 0
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == "prefill" and out["kl_divergence"] == 0.0


def test_bench_kv_row_measures_the_decode_path(path) -> None:
    from frugallm.lab import bench, hwprobe, sweep

    settings = bench.BenchSettings(probe=hwprobe.measure("cpu", quick=True), quality_windows=1, quality_window_len=48)
    base = {k: getattr(sweep.BenchPoint, k) for k in sweep.POINT_FIELDS}
    tiny = dict(model=path, dtype="float32", device="cpu", batch=1, prompt_len=16, gen_len=4, repeat=1, warmup=0,
                threads=1, quality=True)
    plain = bench.run_point({**base, **tiny}, settings)
    kv = bench.run_point({**base, **tiny, "kv": "kivi:bits=2,group=16,residual=16"}, settings)
    assert plain["quality"]["path"] == "prefill" and kv["quality"]["path"].startswith("decode:")
    assert kv["metrics"]["perplexity"] != plain["metrics"]["perplexity"]
    assert kv["quality"]["decode_kl_divergence"] > 0
    assert any("quick one" in f for f in plain["flags"])  # the probe's caveats travel with the record
