"""The converted-weights cache trusts no entry it cannot verify (issue 16 #6, #8): a damaged or poisoned entry is
rebuilt once with a warning naming --no-cache, and the model loads exactly as without the cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from frugallm import LLM
from frugallm.loading import weight_cache


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FRUGALLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def gguf(tiny_models) -> Path:
    return tiny_models.gguf("llama", "Q8_0")


def load(path: Path, use_cache: bool = True) -> LLM:
    return LLM(str(path), weights="dequantize", dtype="float32", device="cpu", use_cache=use_cache)


def params(llm: LLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in llm.model.state_dict().items()}


def entry(cache: Path) -> Path:
    (d,) = (cache / "weights").iterdir()
    return d


def _rewrite(d: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(d / "model.safetensors")
    edit(state)
    save_file(state, str(d / "model.safetensors"))


def flip_tensor_bytes(d: Path) -> None:
    """Corrupt bytes in the middle of the data, the header intact: safetensors still loads it."""
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    mid = header + (len(raw) - header) // 2
    raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])
    f.write_bytes(bytes(raw))


def truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def wrong_shape(d: Path) -> None:
    _rewrite(d, lambda s: s.update({(k := sorted(s)[0]): s[k].reshape(-1)[: s[k].numel() // 2].clone()}))


def missing_tensor(d: Path) -> None:
    _rewrite(d, lambda s: s.pop(sorted(s)[-1]))


def empty_meta(d: Path) -> None:
    (d / "meta.json").write_text("{}")


def edited_meta(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta["config"]["num_layers"] += 1
    (d / "meta.json").write_text(json.dumps(meta))


def no_meta(d: Path) -> None:
    (d / "meta.json").unlink()


def consistent_but_wrong(d: Path) -> None:
    """An entry whose checksums all agree (rewritten through save_entry) but whose tensors do not fit the model."""
    state = load_file(d / "model.safetensors")
    meta = json.loads((d / "meta.json").read_text())
    k = sorted(state)[0]
    state[k] = torch.zeros(3, 5)
    weight_cache.save_entry(d, state, {key: meta[key] for key in ("config", "tokenizer", "source_info")})


@pytest.mark.parametrize("poison", [flip_tensor_bytes, truncate, wrong_shape, missing_tensor, empty_meta, edited_meta,
                                    no_meta, consistent_but_wrong])
def test_bad_entry_is_rebuilt_once_with_a_warning(cache: Path, gguf: Path, poison: Callable[[Path], None],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    ref = params(load(gguf, use_cache=False))
    load(gguf)  # converts and writes the entry
    d = entry(cache)
    assert weight_cache.load_entry(d) is not None
    poison(d)
    with caplog.at_level(logging.WARNING, logger="frugallm"):
        second = load(gguf)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "--no-cache" in warnings[0] and "damaged" in warnings[0], warnings
    got = params(second)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # Rewritten: the next load uses it, silently, with the same weights.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="frugallm"):
        third = load(gguf)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert weight_cache.load_entry(entry(cache)) is not None
    assert all(torch.equal(params(third)[k], ref[k]) for k in ref)


def test_good_entry_loads_without_conversion(cache: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = params(load(gguf))
    from frugallm.loading import gguf as gguf_loader

    def no_conversion(*a: object, **k: object) -> None:
        raise AssertionError("converted again although the cache entry is good")

    monkeypatch.setattr(gguf_loader, "iter_gguf_state_dict", no_conversion)
    got = params(load(gguf))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_verify_detects_each_kind(tmp_path: Path) -> None:
    """load_entry alone: every check names what failed."""
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    meta = {"config": {}, "tokenizer": {}, "source_info": {}}
    d = tmp_path / "e"
    weight_cache.save_entry(d, state, meta)
    got, m = weight_cache.load_entry(d)
    assert torch.equal(got["a"], state["a"]) and torch.equal(got["b"], state["b"])
    assert m["tensors"]["a"]["shape"] == [2, 3]
    save_file({"a": state["a"] + 1, "b": state["b"]}, str(d / "model.safetensors"))
    assert weight_cache.load_entry(d) is None and not d.exists()  # removed: the caller rebuilds
