"""Bad input gives a clear FrugalError (and a one-line CLI error with exit code 2), never a traceback."""

from __future__ import annotations

import json
import re
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


# -- absurd model configs (issue 16 #3, #10): rejected by name before anything is allocated -----------------
HF_CFG = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,
          "num_hidden_layers": 1, "vocab_size": 10}


def _write_gguf_header(path: Path, **fields: int) -> Path:
    """A llama GGUF with the given ``llama.*`` integer fields (defaults: a 1-layer 8-wide model)."""
    import gguf

    kv = {"embedding_length": 8, "attention.head_count": 2, "feed_forward_length": 16, "block_count": 1, **fields}
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in kv.items():
        w.add_uint32(f"llama.{k}", v) if v >= 0 else w.add_int32(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((8, 10), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"context_length": 2**32 - 1}, "max_position_embeddings is 4294967295, outside [1, 16777216]"),
        ({"attention.head_count": 0}, "num_heads is 0"),  # was ZeroDivisionError
        ({"block_count": 10**9}, "num_layers is 1000000000"),
    ],
)
def test_gguf_absurd_header(tmp_path: Path, fields: dict[str, int], needle: str) -> None:
    p = _write_gguf_header(tmp_path / "m.gguf", **fields)
    with pytest.raises(ModelLoadError, match=re.escape(needle)) as e:
        _load(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "text, needle",
    [
        (json.dumps({**HF_CFG, "max_position_embeddings": 2**40}), "max_position_embeddings is 1099511627776"),
        (json.dumps(HF_CFG).replace('"num_hidden_layers": 1', '"num_hidden_layers": 1e999'),
         "num_hidden_layers must be an integer, got inf"),  # was OverflowError
        (json.dumps({**HF_CFG, "num_hidden_layers": 1e9}), "num_layers is 1000000000"),
        (json.dumps({**HF_CFG, "num_attention_heads": 0}), "num_heads is 0"),
        (json.dumps({**HF_CFG, "hidden_size": "wide"}), "hidden_size must be an integer"),
        ("[1, 2, 3]", "config.json must be a JSON object, got list"),  # was AttributeError
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # was RecursionError
    ],
)
def test_hf_absurd_config(tmp_path: Path, text: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=re.escape(needle)):
        _load(tmp_path)
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


def test_rope_table_grows_with_positions_used() -> None:
    import torch

    from frugallm.config import ModelConfig
    from frugallm.model.llama import ROPE_MIN_LEN, Transformer
    from frugallm.model.ops import rope_inv_freq

    cfg = ModelConfig.from_hf({**HF_CFG, "max_position_embeddings": 2**24})  # a full table would be 16 GiB
    with torch.device("meta"):
        model = Transformer(cfg)
    cpu = torch.device("cpu")
    assert model.rope_tables(cpu)[0].shape == (ROPE_MIN_LEN, cfg.head_dim)
    cos, sin = model.rope_tables(cpu, ROPE_MIN_LEN + 1)
    assert cos.shape[0] == 2 * ROPE_MIN_LEN
    angle = 5000 * rope_inv_freq(cfg)
    torch.testing.assert_close(cos[5000, : cfg.head_dim // 2], angle.cos())
    torch.testing.assert_close(sin[5000, cfg.head_dim // 2 :], angle.sin())
    with torch.device("meta"):
        small = Transformer(ModelConfig.from_hf({**HF_CFG, "max_position_embeddings": 6000}))
    assert small.rope_tables(cpu, 2**30)[0].shape[0] == 6000  # never beyond the context


# -- model files that are not regular GGUF files (issue 16 #9): checked before the file is hashed ------------
@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_device_file_is_rejected_before_hashing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--model", "/dev/zero"]) == 2  # was: hashed /dev/zero forever
    assert capsys.readouterr().err == "error: /dev/zero is not a regular file; pass a .gguf file or a model folder\n"


def test_fifo_is_rejected_without_opening(tmp_path: Path) -> None:
    import os

    from frugallm.loading import describe

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)  # opening it would block until a writer comes
    with pytest.raises(ModelLoadError, match="not a regular file"):
        describe(fifo)


def test_non_gguf_file_is_not_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from frugallm.loading import describe, weight_cache

    def no_hash(path: Path) -> str:
        raise AssertionError("hashed a file that is not a GGUF")

    monkeypatch.setattr(weight_cache, "file_hash", no_hash)
    p = tmp_path / "big.bin"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 4096)  # stands for a multi-GB archive
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        describe(p)


# -- CLI options out of range (issue 16 #10) -----------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hi", "--seed", str(2**70)], "seed must be an integer in [-2**63, 2**64), got 2**70"),
        (["generate", "hi", "--threads", "-3"], "threads must be in [1, 4096], got -3"),
    ],
)
def test_cli_option_out_of_range(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2  # were OverflowError / RuntimeError tracebacks
    assert capsys.readouterr().err == f"error: {message.replace('2**70', str(2**70))}\n"


def test_quantize_into_read_only_folder_fails_before_quantizing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    import frugallm.quant.commands as qc

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("loaded and quantized before checking the output")

    monkeypatch.setattr(qc, "LLM", no_load)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes into 0o555 folders; nobody creates files in /proc
        ro = Path("/proc")
    try:
        assert main(["quantize", "default", "--quant", "int8", "-o", str(ro / "out")]) == 2
    finally:
        (tmp_path / "ro").chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write output {ro / 'out'}: {ro} is not writable") and err.count("\n") == 1


@pytest.mark.parametrize("layers_field", ["num_hidden_layers", "num_layers"])
def test_quantized_folder_absurd_layers_rejected_before_building(tmp_path: Path, layers_field: str) -> None:
    # issue 16 #4: a quantized folder's config.json with 1e9 layers built modules (RSS growing) before any check
    from frugallm.config import ModelConfig
    from frugallm.quant.storage import CONFIG_FILE, META_FILE

    cfg = ModelConfig.from_hf({**HF_CFG, "max_position_embeddings": 64})
    d = cfg.to_hf() if layers_field == "num_hidden_layers" else cfg.to_dict()  # today's form and the older dump
    d[layers_field] = 1e9
    meta = {"format": "frugallm-quant", "format_version": 1, "spec": "int8", "modules": {}}
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    (tmp_path / CONFIG_FILE).write_text(json.dumps(d))
    with pytest.raises(FrugalError, match="num_layers is 1000000000, outside|num_layers must be an integer"):
        _load(tmp_path)
