"""``frugallm bench``: every metric or a reason, JSONL resume, error records, peers, the endpoint load generator."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from frugallm.cli import main
from frugallm.errors import FrugalError
from frugallm.lab import bench, endpoint, hwprobe, meters, results, sweep
from frugallm.lab.peers.llamacpp import LLAMA_CPP_MISSING

# One thread: on a busy 2-core machine, OpenMP threads waiting on each other make runs 10x slower.
TINY = {"batch": 1, "prompt_len": 16, "gen_len": 4, "repeat": 1, "warmup": 1, "threads": 1}


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def settings() -> bench.BenchSettings:
    # A quick probe measured here (not cached): bench never probes the user's machine in tests.
    return bench.BenchSettings(probe=hwprobe.measure("cpu", quick=True), quality_windows=2, quality_window_len=32)


def point(**kw) -> dict:
    return {k: kw.get(k, getattr(sweep.BenchPoint, k)) for k in sweep.POINT_FIELDS}


def assert_complete(rec: dict) -> None:
    """Every metric key present; every null has a non-empty reason."""
    assert rec["status"] == "ok", rec.get("error")
    assert set(rec["metrics"]) == set(results.METRIC_KEYS)
    for k, v in rec["metrics"].items():
        if v is None:
            assert rec["unavailable"].get(k), f"{k} is null without a reason"
    json.dumps(rec, allow_nan=False)


def test_default_model_every_metric(settings) -> None:
    rec = bench.run_point(point(model="default", quality=True, **TINY), settings)
    assert_complete(rec)
    m = rec["metrics"]
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        assert m[k]["p50"] > 0 and m[k]["p99"] >= m[k]["p50"]
    assert m["output_tokens"] == 4 and m["requests"] == 1
    assert m["weight_bytes"] > 5e7 and m["kv_cache_bytes"] > 0  # 135M params as stored in Q4_1: ~97 MB
    assert m["energy_method"] in ("nvml", "rapl", "estimated") and m["energy_per_token_j"] > 0
    assert m["decode_mbu"] > 0 and m["prefill_mfu"] > 0 and m["predicted_tpot_s"] > 0
    assert 0.25 < m["compression_rate"] < 0.5  # the GGUF runs as stored (Q4_1 matrices) against an fp16 baseline
    assert m["perplexity"] > 1 and m["kl_divergence"] >= 0 and 0.5 < m["top1_agreement"] <= 1
    # Only genuinely unavailable metrics are null: CUDA ones, on a CPU-only machine, and --spec ones without it.
    nulls = {k for k, v in m.items() if v is None}
    assert nulls <= {"cuda_max_allocated_bytes", "cuda_max_reserved_bytes", *results.SPEC_KEYS}
    assert rec["energy_method"] == m["energy_method"] and any(m["energy_method"] in n for n in rec["notes"])
    assert rec["machine"]["cpu_model"] and rec["versions"]["torch"] and "git_commit" in rec
    assert rec["roofline"]["wbits"] < 16 and rec["hardware"]["source"] == "probed"  # bits of the stored blocks


def test_resume_invalid_points_and_interrupt(tmp_path, settings) -> None:
    out = tmp_path / "r.jsonl"
    points = [point(quality=False, **TINY), point(quality=False, **{**TINY, "batch": 0}),
              point(quality=False, **{**TINY, "prompt_len": 100_000}), point(backend="foo", **TINY),
              point(quality=False, **{**TINY, "gen_len": 2})]
    seen = []

    def interrupt_after_two(rec: dict) -> None:
        seen.append(rec)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench.run_points(points, settings, out=out, progress=False, on_record=interrupt_after_two)
    assert [r["status"] for r in results.read_records(out)] == ["ok", "error"]
    with out.open("a") as f:
        f.write('{"status": "ok", "key": "half a li')  # a write cut by a crash: skipped, not fatal
    recs = bench.run_points(points, settings, out=out, progress=False)
    assert [r["status"] for r in recs] == ["error", "error", "ok"]
    assert "exceeds the context window" in recs[0]["error"]
    assert recs[1]["error"] == "unknown backend 'foo'; valid: frugallm, transformers, llama.cpp, endpoint"
    assert recs[2]["metrics"]["tpot_s"]["n"] == 1
    all_recs = results.read_records(out)
    assert len(all_recs) == 5 and "batch must be an integer >= 1, got 0" in all_recs[1]["error"]
    assert bench.run_points(points, settings, out=out, progress=False) == []  # everything done


def test_missing_llama_cpp_is_a_clean_error_record(settings, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without the extra looks like
    rec = bench.run_point(point(backend="llama.cpp", **TINY), settings)
    assert rec["status"] == "error" and rec["error"] == LLAMA_CPP_MISSING
    out = bench.run_points([point(backend="llama.cpp", **TINY), point(quality=False, **TINY)], settings,
                           progress=False)
    assert [r["status"] for r in out] == ["error", "ok"]  # the other points still run


def test_llama_cpp_peer(settings) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (frugallm[llamacpp]) is not installed")
    rec = bench.run_point(point(backend="llama.cpp", **{**TINY, "batch": 2, "gen_len": 5}), settings)
    assert_complete(rec)
    m = rec["metrics"]
    assert m["requests"] == 2 and m["output_tokens"] == 10 and m["tpot_s"]["p50"] > 0
    assert m["kv_cache_bytes"] is None and "llama-cpp-python" in rec["unavailable"]["kv_cache_bytes"]
    assert m["perplexity"] is None and "logits_all" in rec["unavailable"]["perplexity"]
    assert 0 < m["weight_bytes"] < 2e8  # the GGUF file: quantized weights run as stored


def test_transformers_peer_on_tiny_model(tiny_models, settings) -> None:
    pytest.importorskip("transformers")
    model = str(tiny_models.hf("llama"))
    rec = bench.run_point(point(model=model, backend="transformers", batch=2, prompt_len=8, gen_len=3, repeat=2,
                                threads=1), settings)
    assert_complete(rec)
    m = rec["metrics"]
    assert m["requests"] == 4 and m["output_tokens"] == 12 and m["kv_cache_bytes"] > 0
    assert rec["engine"]["dtype"] == "float32"
    # Same weights, both fp32: transformers agrees with frugallm's float32 reference.
    assert m["kl_divergence"] < 1e-4 and m["top1_agreement"] == 1.0


def test_cli_bench_errors_and_roofline(capsys, tiny_models) -> None:
    assert main(["bench", "--backend", "foo", "--batch", "1"]) == 2
    assert "unknown backend 'foo'" in capsys.readouterr().err
    assert main(["roofline", str(tiny_models.hf("llama")), "--hw", "h100", "--batch", "2", "--prompt-len", "64",
                 "--gen-len", "8", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["hardware"] == "h100-sxm" and rep["decode"]["phase"] == "decode"
    assert main(["hw", "specs"]) == 0 and "h100-sxm" in capsys.readouterr().out


def test_sweep_files(tmp_path) -> None:
    y = tmp_path / "s.yaml"
    y.write_text("models: [default]\nengine:\n  - {dtype: float32}\n  - {dtype: auto, quant: 'int4:group=32'}\n"
                 "batch: [1, 2]\nprompt_len: 16\ngen_lens: [2, 4]\nrepeat: 1\nquality: false\nthreads: 1\n")
    pts = sweep.expand_sweep(sweep.read_sweep_file(y))
    assert len(pts) == 8 and {p["quant"] for p in pts} == {None, "int4:group=32"}
    assert all(p["repeat"] == 1 and not p["quality"] and p["threads"] == 1 for p in pts)
    t = tmp_path / "s.toml"
    t.write_text('model = "default"\ndtype = ["float32", "float16"]\nbatch = [1, 0]\n')
    pts = sweep.expand_sweep(sweep.read_sweep_file(t), {"gen_len": 3})
    assert len(pts) == 4 and all(p["gen_len"] == 3 for p in pts)
    with pytest.raises(FrugalError, match="unknown key"):
        sweep.expand_sweep({"batchez": [1]})
    with pytest.raises(FrugalError, match="cannot read sweep file"):
        sweep.read_sweep_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("batch: [1\n")
    with pytest.raises(FrugalError, match="cannot parse"):
        sweep.read_sweep_file(tmp_path / "bad.yaml")


def test_summarize_and_energy_meters(tmp_path) -> None:
    s = meters.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["p50"] == 3.0 and s["p90"] == pytest.approx(4.6) and s["min"] == 1.0 and s["n"] == 5
    assert meters.summarize([]) is None
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("999000\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone: must not be counted twice
    meter = meters.RaplMeter(tmp_path)
    (zone / "energy_uj").write_text("1000\n")  # wrapped around
    assert meter.read() == pytest.approx(0.002)
    est = meters.EstimatedMeter(10.0)
    e0, t0 = est.read(), time.process_time()
    while time.process_time() - t0 < 0.05:
        pass
    assert est.read() > e0 and est.method == "estimated"


# ------------------------------------------------------------------------------------------- endpoint


class _FakeSSE(BaseHTTPRequestHandler):
    tokens = 5
    fail = False

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"data": [{"id": "fake-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.fail or req.get("model") != "fake-model" or not req.get("stream"):
            self.send_error(500, "boom")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(req["max_tokens"]):
            time.sleep(0.002)
            chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": req["max_tokens"]}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
def fake_server():
    servers = []

    def start(fail: bool = False) -> str:
        handler = type("H", (_FakeSSE,), {"fail": fail})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_load_generator(fake_server) -> None:
    url = fake_server()
    reqs, wall = endpoint.run_load(url, ["a", "b"], max_tokens=5, concurrency=2, requests=4)
    assert wall > 0 and len(reqs) == 4
    assert all(r.ok and r.output_tokens == 5 and 0 < r.ttft_s < r.e2e_s and r.tpot_s > 0 for r in reqs)
    bad = fake_server(fail=True)
    reqs, _ = endpoint.run_load(bad, ["a"], max_tokens=3, concurrency=1, requests=2, model="fake-model")
    assert not any(r.ok for r in reqs) and "HTTP 500" in reqs[0].error
    reqs, _ = endpoint.run_load(f"http://127.0.0.1:{_closed_port()}", ["a"], max_tokens=3, concurrency=1,
                                requests=1, model="m")
    assert not reqs[0].ok and "cannot reach" in reqs[0].error


def test_endpoint_bench_point(fake_server, tiny_models, settings) -> None:
    model = str(tiny_models.hf("llama"))
    url = fake_server()
    rec = bench.run_point(point(model=model, backend="endpoint", endpoint=url, concurrency=2, requests=6,
                                prompt_len=16, gen_len=4, warmup=1), settings)
    assert_complete(rec)
    assert rec["metrics"]["requests"] == 6 and rec["metrics"]["output_tokens"] == 24
    assert "remote endpoint" in rec["unavailable"]["weight_bytes"]
    down = bench.run_point(point(model=model, backend="endpoint", endpoint=f"http://127.0.0.1:{_closed_port()}",
                                 requests=2, warmup=0, prompt_len=8, gen_len=2), settings)
    assert down["status"] == "error" and "all 2 requests" in down["error"] and "cannot reach" in down["error"]
