"""Shared pytest fixtures: tiny random models (HF folders and GGUF files) built once per session."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))  # tiny_models, quant_models: shared by every folder

import tiny_models as tm  # noqa: E402

# Fixed thread counts: tests compare outputs bit for bit, and a thread count changed mid-run by the governor (on a
# crowded machine) may change a GEMM's summation order. tests/engine/test_threads.py turns it on where it tests it.
os.environ.setdefault("FRUGALLM_ADAPTIVE_THREADS", "0")

# Modules whose tests exercise native kernels or CPU-dependent defaults: marked ``isa``, so that `make test` reruns
# them with FRUGALLM_ISA=avx2 on AVX-512 machines (each machine tests every kernel variant it can execute).
ISA_MODULES = {"test_native_build.py", "test_gguf_linear.py", "test_gguf_q8.py", "test_gguf_stored.py",
               "test_paged_attention.py", "test_packed_linear.py", "test_llm.py", "test_decode_plan.py",
               "test_kv_pool_attention.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in ISA_MODULES:
            item.add_marker(pytest.mark.isa)


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


class TinyModelFactory:
    """Builds tiny models on demand under one session temp dir and caches paths and reference models.

    ``hf(arch, **hf_kwargs)`` -> HF folder; ``gguf(arch, tensor_type, **kw)`` -> GGUF file converted from the
    matching HF folder; ``hf_reference`` / ``gguf_reference`` -> cached transformers models (fp32, eager;
    the GGUF one holds exactly the GGUF's dequantized weights); ``*_logits(ids)`` -> cached reference logits.
    ``hf_kwargs`` are those of :func:`tiny_models.make_hf_model` (``sharded``, ``tie_word_embeddings``,
    ``rope_scaling``, ``dtype``, ``config_format``, ``tokenizer_pre``, config overrides like ``hidden_size``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, Path] = {}
        self._models: dict[str, Any] = {}
        self._logits: dict[str, Any] = {}

    def hf(self, arch: str, **hf_kwargs: Any) -> Path:
        k = _key("hf", arch, hf_kwargs)
        if k not in self._paths:
            d = self.root / f"hf-{arch}-{len(self._paths)}"
            self._paths[k] = tm.make_hf_model(d, arch, **hf_kwargs)
        return self._paths[k]

    def gguf(
        self,
        arch: str,
        tensor_type: str = "F32",
        *,
        embed_type: str | None = None,
        output_type: str | None = None,
        overrides: dict[str, str] | None = None,
        **hf_kwargs: Any,
    ) -> Path:
        k = _key("gguf", arch, tensor_type, embed_type, output_type, overrides, hf_kwargs)
        if k not in self._paths:
            hf_dir = self.hf(arch, **hf_kwargs)
            out = self.root / f"{arch}-{tensor_type}-{len(self._paths)}.gguf"
            self._paths[k] = tm.make_gguf(
                hf_dir,
                out,
                tensor_type=tensor_type,
                embed_type=embed_type,
                output_type=output_type,
                overrides=overrides,
                tokenizer_pre=hf_kwargs.get("tokenizer_pre", "smollm"),
            )
        return self._paths[k]

    def hf_reference(self, arch: str, **hf_kwargs: Any):
        d = self.hf(arch, **hf_kwargs)
        if str(d) not in self._models:
            self._models[str(d)] = tm.load_hf_reference(d)
        return self._models[str(d)]

    def gguf_reference(self, arch: str, tensor_type: str = "F32", **kw: Any):
        g = self.gguf(arch, tensor_type, **kw)
        if str(g) not in self._models:
            hf_kw = {k: v for k, v in kw.items() if k not in ("embed_type", "output_type", "overrides")}
            self._models[str(g)] = tm.load_gguf_reference(self.hf(arch, **hf_kw), g)
        return self._models[str(g)]

    def reference_logits(self, path: Path, model, ids: list[int]):
        k = _key(str(path), ids)
        if k not in self._logits:
            self._logits[k] = tm.reference_logits(model, ids)
        return self._logits[k]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Converted weights and probes go to a per-session dir: tests never see a stale user cache."""
    import os

    os.environ["FRUGALLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("frugallm_cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    tm.quiet_transformers()
    return TinyModelFactory(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_tokenizer")
    tm.make_tokenizer_json(d)
    return d


@pytest.fixture(scope="session")
def tiny_ids() -> list[int]:
    """40 token ids (a real encoding of mixed text, then random non-special ids)."""
    return tm.sample_ids(40)


@pytest.fixture(scope="session")
def mixed_text() -> str:
    return tm.MIXED_TEXT


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Tiny-model steps are microseconds of work: on a shared CPU, intra-op threads only add spinning. Modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
