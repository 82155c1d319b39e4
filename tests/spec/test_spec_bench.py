"""``frugallm bench --spec``: the record's speculation metrics are present and consistent, beside the same point
decoded without speculation; bad ``--spec`` points are error records; old records keep their resume keys."""

from __future__ import annotations

import io

import pytest

from frugallm.lab import bench, hwprobe, results, sweep

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"batch": 1, "prompt_len": 24, "gen_len": 24, "repeat": 1, "warmup": 0, "threads": 1, "quality": False}


@pytest.fixture(scope="module")
def settings() -> bench.BenchSettings:
    return bench.BenchSettings(probe=hwprobe.measure("cpu", quick=True))


def point(**kw) -> dict:
    return {k: kw.get(k, getattr(sweep.BenchPoint, k)) for k in sweep.POINT_FIELDS}


@pytest.mark.parametrize("spec", ["ngram:k=4:adaptive=off", "self:layers=1:k=3:adaptive=off"])
def test_spec_record_fields_present_and_consistent(tiny_models, settings, spec: str) -> None:
    model = str(tiny_models.gguf("llama", "F32"))
    rec = bench.run_point(point(model=model, dtype="float32", spec=spec, **TINY), settings)
    assert rec["status"] == "ok", rec.get("error")
    m, st = rec["metrics"], rec["spec"]
    assert set(m) == set(results.METRIC_KEYS)
    for k, v in m.items():
        assert v is not None or rec["unavailable"].get(k), f"{k} is null without a reason"
    k = int(spec.split("k=")[1].split(":")[0])
    assert st["config"] == spec and st["spec_rounds"] > 0 and st["spec_drafted"] > 0
    assert 0 <= st["spec_accepted"] <= st["spec_drafted"]
    assert 0.0 <= m["spec_acceptance_rate"] <= 1.0
    assert m["spec_acceptance_rate"] == pytest.approx(st["spec_accepted"] / st["spec_drafted"], abs=1e-3)
    assert 1.0 <= m["spec_mean_accepted_length"] <= k + 1
    by_pos = m["spec_acceptance_by_position"]
    assert 1 <= len(by_pos) <= k and all(0.0 <= x <= 1.0 for x in by_pos)
    assert all(a <= p for a, p in zip(st["accepted_at"], st["proposed_at"], strict=True))
    assert st["proposed_at"] == sorted(st["proposed_at"], reverse=True)  # a round drafting i+1 tokens drafted i
    # A draft token at position i+1 is only kept after the one at i was.
    assert st["accepted_at"] == sorted(st["accepted_at"], reverse=True)
    assert sum(st["accepted_at"]) == st["spec_accepted"]
    assert 0.0 <= m["spec_draft_share"] <= 1.0 and m["spec_memory_bytes"] > 0
    assert m["nospec_output_tokens_per_s"] > 0 and m["output_tokens_per_s"] > 0
    assert m["spec_speedup"] == pytest.approx(m["output_tokens_per_s"] / m["nospec_output_tokens_per_s"])
    assert m["spec_decode_speedup"] > 0 and m["nospec_tpot_s"]["n"] == 1
    assert m["output_tokens"] == TINY["gen_len"]  # speculation never emits past gen_len
    assert any("--spec" in n for n in rec["notes"]) and f"spec={spec}" in rec["label"]
    out = io.StringIO()
    results.print_table([rec], file=out)
    assert "accept" in out.getvalue() and "spec x" in out.getvalue() and "spec +MB" in out.getvalue()


def test_plain_point_has_spec_metrics_null_with_reason(tiny_models, settings) -> None:
    rec = bench.run_point(point(model=str(tiny_models.gguf("llama", "F32")), dtype="float32", **TINY), settings)
    assert rec["status"] == "ok" and "spec" not in rec
    assert all(rec["metrics"][k] is None and rec["unavailable"][k] == "no --spec" for k in results.SPEC_KEYS)
    assert "accept" not in results.summary_rows([rec])[0]


def test_bad_spec_points_are_error_records(settings) -> None:
    rec = bench.run_point(point(spec="ngramz:k=3", **TINY), settings)
    assert rec["status"] == "error" and "unknown speculative method 'ngramz'" in rec["error"]
    rec = bench.run_point(point(spec="ngram:k=99", **TINY), settings)
    assert rec["status"] == "error" and "k must be in [1, 14]" in rec["error"]
    rec = bench.run_point(point(backend="transformers", spec="ngram", **TINY), settings)
    assert rec["status"] == "error" and "backend transformers does not take it" in rec["error"]


def test_spec_axis_in_sweeps_and_stable_keys() -> None:
    pts = sweep.expand_sweep({"model": "default", "specs": [None, "ngram:k=8"]})
    assert [p["spec"] for p in pts] == [None, "ngram:k=8"]
    old = {k: v for k, v in point().items() if k != "spec"}  # a record written before --spec existed
    assert results.point_key(old) == results.point_key(point()) != results.point_key(point(spec="ngram"))
    pts = sweep.expand_sweep({"engine": [{"spec": "ngram"}, {"quant": "int8"}]})
    assert [(p["spec"], p["quant"]) for p in pts] == [("ngram", None), (None, "int8")]
