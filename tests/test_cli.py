"""The ``frugallm`` CLI end to end on a tiny model (and ``info`` on the default model)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from frugallm.cli import main


@pytest.fixture(scope="module")
def model(tiny_models) -> str:
    return str(tiny_models.gguf("llama", "Q8_0"))


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("generate", "chat", "info", "fetch"):
        assert cmd in out


def test_generate_json(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hello", "--model", model, "--dtype", "float32", "-n", "5", "--ignore-eos", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["token_ids"]) == 5 and rec["finish_reason"] == "length"
    assert {"load_s", "ttft_s", "e2e_s"} <= set(rec["timings"])


def test_generate_prompt_from_stdin_streams(model: str, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    assert main(["generate", "--model", model, "--dtype", "float32", "-n", "4", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_chat_session_reset_and_exit(model: str, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nagain\n/exit\n"))
    assert main(["chat", "--model", model, "--dtype", "float32", "-n", "3", "--ignore-eos"]) == 0
    assert "(history cleared)" in capsys.readouterr().out


def test_info_json_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["chat_template"]
    assert info["bytes_per_tensor_type"]["Q4_1"] > 0
    assert 130e6 < info["parameters"] < 140e6


def test_console_script_nonzero_exit_without_traceback() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "frugallm.cli", "generate", "x", "--model", "/missing.gguf"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_generate_with_quant_and_kv(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "hello world", "--model", model, "--dtype", "float32", "-n", "5", "--ignore-eos", "--json"]
    assert main([*base, "--quant", "int8", "--kv", "kivi:bits=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 5 and out["timings"]["kv_cache_bytes"] > 0
    assert main([*base, "--quant", "int5"]) == 2
    assert "int5 is not supported" in capsys.readouterr().err
    assert main([*base, "--kv", "nope"]) == 2
    assert "unknown KV policy 'nope'" in capsys.readouterr().err


def test_generate_weights_modes(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--weights`` reaches ``LLM``: stored-q8 decodes a GGUF; a mode the load cannot honour is a one-line error."""
    base = ["generate", "hello world", "--model", model, "-n", "4", "--ignore-eos", "--json"]
    assert main([*base, "--weights", "stored-q8"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
    assert main([*base, "--weights", "stored-q8", "--dtype", "bfloat16"]) == 2
    assert "weights='stored-q8' cannot be used here: dtype=bfloat16" in capsys.readouterr().err
