"""Bad input gives a clear FrugalError (and a one-line CLI error with exit code 2), never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from frugallm import LLM, SamplingParams
from frugallm.cli import main
from frugallm.errors import FrugalError, InvalidRequestError, ModelLoadError, TemplateError
from frugallm.loading import default_model_path, load_model
from frugallm.tokenizer.chat_template import render_chat


def _load(path: Path) -> None:
    import torch

    load_model(path, torch.float32, torch.device("cpu"), use_cache=False)


def test_missing_path() -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        _load(Path("/nonexistent/model.gguf"))


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        _load(tmp_path)


def test_bad_magic(tmp_path: Path) -> None:
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="bad magic"):
        _load(p)


def test_truncated_gguf(tmp_path: Path) -> None:
    p = tmp_path / "trunc.gguf"
    with open(default_model_path(), "rb") as f:
        p.write_bytes(f.read(4 << 20))
    with pytest.raises(ModelLoadError, match="truncated"):
        _load(p)


def test_truncated_header(tmp_path: Path) -> None:
    p = tmp_path / "hdr.gguf"
    with open(default_model_path(), "rb") as f:
        p.write_bytes(f.read(64))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        _load(p)


def _write_gguf(path: Path, arch: str, tensor_offset_bug: bool = False) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    p = _write_gguf(tmp_path / "falcon.gguf", "falcon")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'falcon'.*llama, mistral, qwen2, qwen3"):
        _load(p)


def test_wrong_tensor_offset(tmp_path: Path) -> None:
    p = _write_gguf(tmp_path / "off.gguf", "llama")
    data = bytearray(p.read_bytes())
    # the single tensor's info ends with its uint64 offset (0); point it far past the end of the file
    name = b"token_embd.weight"
    i = data.index(name) + len(name) + 4 + 2 * 8 + 4  # n_dims (u32), 2 dims (u64), type (u32)
    data[i : i + 8] = (10**9).to_bytes(8, "little")
    p.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="offset"):
        _load(p)


def test_hf_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,'
        ' "num_hidden_layers": 1, "vocab_size": 10}'
    )
    with pytest.raises(ModelLoadError, match="safetensors"):
        _load(tmp_path)


def test_hf_config_missing_field(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ModelLoadError, match="num_attention_heads"):
        _load(tmp_path)


def test_hf_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        _load(tmp_path)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("default", dtype="float32", device="cpu", max_model_len=64)


def test_prompt_longer_than_context_names_both_numbers(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match=r"prompt is \d+ tokens but the context window is 64"):
        llm.generate(["word " * 200], SamplingParams(max_tokens=4))


def test_empty_prompt(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([""], SamplingParams(max_tokens=4))


def test_generation_stops_at_context_end(llm: LLM) -> None:
    out = llm.generate(["word " * 50], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) <= 64


def test_out_of_range_token_ids(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="out of range"):
        llm.generate([[1, 2, 10**7]], SamplingParams(max_tokens=2))


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set x = messages.append(1) %}{{ x }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_chat_template_cannot_escape_sandbox(template: str) -> None:
    with pytest.raises(TemplateError):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_chat_template_raise_exception_is_clear() -> None:
    with pytest.raises(TemplateError, match="only user and assistant"):
        render_chat("{{ raise_exception('only user and assistant') }}", [{"role": "user", "content": "hi"}])


def test_chat_template_bad_messages() -> None:
    with pytest.raises(TemplateError, match="role"):
        render_chat(None, [{"content": "hi"}])


def test_chat_template_renders_chatml() -> None:
    s = render_chat(None, [{"role": "user", "content": "hi"}])
    assert s == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "--top-k", "-3"], "top_k"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
        (["generate", "   "], "empty"),
        (["generate", "hi", "--model", "/nonexistent.gguf"], "not found"),
        (["info", "/nonexistent"], "not found"),
        (["generate", "hi", "--dtype", "float7"], "dtype"),
    ],
)
def test_cli_errors_exit_2_with_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert "Traceback" not in err


def test_cli_corrupt_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.gguf"
    shutil.copyfile(__file__, p)
    assert main(["info", str(p)]) == 2
    assert "not a GGUF file" in capsys.readouterr().err


def test_frugal_error_is_value_error() -> None:
    assert issubclass(FrugalError, ValueError)


# -- invalid Unicode (issue 16 #2) ---------------------------------------------------------------------------
def test_lone_surrogate_prompt_is_invalid_request(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="surrogate"):
        llm.generate(["a\ud800b"], SamplingParams(max_tokens=2))


def test_cli_invalid_utf8_argv(capsys: pytest.CaptureFixture[str]) -> None:
    # Python hands undecodable argv bytes to main as lone surrogates (os.fsdecode(b"a\xffb") == "a\udcffb").
    assert main(["generate", "a\udcffb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt argument is not valid UTF-8") and err.count("\n") == 1


def test_cli_invalid_utf8_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n"), encoding="utf-8"))
    assert main(["generate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stdin is not valid UTF-8 (byte 3") and "Traceback" not in err
