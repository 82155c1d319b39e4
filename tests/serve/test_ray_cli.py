"""``frugallm serve --ray``'s flags reach the Ray deployment (its start is stubbed: no cluster here; the deployment
itself is tested in test_ray_serve.py), and bad combinations are one error line."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve tests need the 'ray' extra: pip install 'frugallm[ray]'")

from frugallm.cli import main  # noqa: E402
from frugallm.engine.llm_engine import LLMEngine  # noqa: E402


def test_serve_ray_flags_reach_the_deployment(tiny_models, monkeypatch) -> None:
    import frugallm.serve.ray_app as ray_app

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray_app, "serve_forever", lambda build, options, **kw: calls.append(
        {"build": build, "options": options, **kw}) or 0)
    model = str(tiny_models.hf("llama"))
    assert main(["serve", model, "--ray", "--replicas", "3", "--address", "auto", "--port", "8123", "--threads", "2",
                 "--api-key", "k", "--served-model-name", "tiny", "--max-queue", "64", "--dtype", "float32",
                 "--num-blocks", "32", "--block-size", "4", "--ray-router", "pow2"]) == 0
    (call,) = calls
    opts = call["options"]
    assert (call["address"], call["host"], call["port"]) == ("auto", "127.0.0.1", 8123)
    assert (opts.served_model_name, opts.replicas, opts.api_key, opts.max_queue, opts.replica_cpus) == (
        "tiny", 3, "k", 64, 2.0)
    assert "127.0.0.1" in opts.allowed_hosts and opts.replica_gpus == 0 and opts.router == "pow2"
    engine = call["build"]()  # what each replica runs: the plain server's engine build
    assert isinstance(engine, LLMEngine) and engine.block_manager.num_blocks == 32


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2"], "--replicas, --address and --ray-router need --ray"),
    (["--address", "auto"], "--replicas, --address and --ray-router need --ray"),
    (["--ray", "--replicas", "0"], "--replicas must be an integer >= 1"),
    (["--ray", "--model", "/nonexistent/model"], "model path not found: /nonexistent/model"),  # before Ray starts
])
def test_bad_ray_flags_are_one_error(tiny_models, capsys, argv: list[str], message: str) -> None:
    assert main(["serve", "--model", str(tiny_models.hf("llama")), "--dtype", "float32", *argv]) == 2
    assert message in capsys.readouterr().err
