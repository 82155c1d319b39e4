"""``frugallm serve`` as a command: a subprocess serving a tiny model end to end, and options refused up front."""

from __future__ import annotations

import time

import httpx
import pytest

from live_server import free_port

pytestmark = pytest.mark.usefixtures("one_thread")


def test_serve_command_end_to_end(tiny_models) -> None:
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-c", "from frugallm.cli import main; raise SystemExit(main())", "serve",
           str(tiny_models.hf("llama")), "--port", str(port), "--dtype", "float32", "--device", "cpu",
           "--api-key", "k", "--num-blocks", "64", "--block-size", "8", "--max-num-seqs", "4",
           "--served-model-name", "tiny-cli", "--no-chunked-prefill", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        h = {"Authorization": "Bearer k"}
        assert httpx.get(f"{base}/v1/models", headers=h).json()["data"][0]["id"] == "tiny-cli"
        r = httpx.post(f"{base}/v1/completions", headers=h, json={"model": "tiny-cli", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}).status_code == 401
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "64 blocks x 8 tokens" in err and "chunked prefill False" in err


def test_serve_command_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from frugallm.cli import main

    assert main(["serve", "--kv", "xquant:bits=2"]) == 2  # under batching only the paging policies (issue 17 #5)
    err = capsys.readouterr().err
    assert "xquant cannot run under continuous batching" in err and "policies that do:" in err and "kivi" in err
    assert main(["serve", "--block-size", "0"]) == 2
    assert "block_size" in capsys.readouterr().err
