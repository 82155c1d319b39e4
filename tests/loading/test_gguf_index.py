"""The cached GGUF header index: the same metadata and tensor views as gguf's reader, and never trusted stale."""

from __future__ import annotations

import os

import numpy as np
import pytest

from frugallm.loading import gguf_index
from frugallm.loading.gguf_file import GGUFModelFile


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FRUGALLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0", "Q4_1"])
def test_second_open_reads_the_index_with_identical_contents(tiny_models, fresh_cache, tensor_type) -> None:
    path = tiny_models.gguf("qwen2", tensor_type)
    first = GGUFModelFile(path)
    assert not isinstance(first.reader, gguf_index.IndexedReader)
    second = GGUFModelFile(path)
    assert isinstance(second.reader, gguf_index.IndexedReader)
    assert second.config() == first.config()
    assert second.tokenizer_meta() == first.tokenizer_meta()
    assert second.tensor_type_bytes() == first.tensor_type_bytes()
    for name, t in first.tensors.items():
        u = second.tensors[name]
        assert (u.tensor_type, list(u.shape), u.n_bytes, u.data_offset) == (t.tensor_type, list(t.shape), t.n_bytes,
                                                                            t.data_offset)
        assert u.data.dtype == t.data.dtype and u.data.shape == t.data.shape
        assert np.array_equal(u.data.view(np.uint8), t.data.view(np.uint8))
        np.testing.assert_array_equal(second.tensor(name), first.tensor(name))


def test_changed_or_corrupt_entries_are_not_used(tiny_models, fresh_cache, tmp_path) -> None:
    src = tiny_models.gguf("llama", "Q8_0")
    path = tmp_path / "m.gguf"
    path.write_bytes(src.read_bytes())
    GGUFModelFile(path)
    assert isinstance(GGUFModelFile(path).reader, gguf_index.IndexedReader)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: a new version
    assert not isinstance(GGUFModelFile(path).reader, gguf_index.IndexedReader)
    for entry in (fresh_cache / "gguf-index").glob("*.json"):
        entry.write_text("{not json")
    assert not isinstance(GGUFModelFile(path).reader, gguf_index.IndexedReader)  # ignored, parsed again
    assert isinstance(GGUFModelFile(path).reader, gguf_index.IndexedReader)  # and rewritten
