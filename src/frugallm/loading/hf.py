"""Hugging Face model folders: ``config.json`` + ``*.safetensors`` (single or sharded index).

Tensors are read through ``safetensors.safe_open`` (memory-mapped), converted one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from frugallm.config import ModelConfig, read_json
from frugallm.errors import ModelLoadError
from frugallm.loading.base import LoadedModel, ModelDescription, check_vocab, materialize
from frugallm.tokenizer.tokenizer import Tokenizer


class HFModelFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelLoadError(f"model folder not found: {self.path}")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(f"{self.path} has no config.json (not a Hugging Face model folder)")
        self.raw_config: dict[str, Any] = read_json(cfg, "model config")
        self._config = ModelConfig.from_hf(self.raw_config)  # reject unknown architectures first
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise ModelLoadError(f"{index}: invalid safetensors index ({e})") from None
            return {name: self.path / fname for name, fname in wm.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.path} has no *.safetensors weights (pickle checkpoints are not loaded)")
        from safetensors import safe_open

        out: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(f, "pt") as sf:
                    out.update({k: f for k in sf.keys()})  # noqa: SIM118 (safe_open has no __iter__)
            except Exception as e:
                raise ModelLoadError(f"{f}: corrupt safetensors file ({e})") from None
        return out

    def config(self) -> ModelConfig:
        return self._config

    def tokenizer_config(self) -> dict[str, Any]:
        p = self.path / "tokenizer_config.json"
        if not p.is_file():
            return {}
        d = read_json(p, "tokenizer config")
        if not isinstance(d, dict):
            raise ModelLoadError(f"{p}: must be a JSON object, got {type(d).__name__}")
        return d

    def dtype_bytes(self) -> dict[str, int]:
        from safetensors import safe_open

        out: dict[str, int] = {}
        for f in sorted(set(self.weight_map.values())):
            with safe_open(f, "pt") as sf:
                for k in sf.keys():  # noqa: SIM118
                    sl = sf.get_slice(k)
                    dt = sl.get_dtype()
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1}.get(dt, 4)
                    out[dt] = out.get(dt, 0) + n * size
        return out


def iter_hf_state_dict(
    folder: HFModelFolder, cfg: ModelConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in frugallm names with q/k/v and gate/up fused."""
    from safetensors import safe_open

    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def get(name: str) -> torch.Tensor:
            f = folder.weight_map.get(name)
            if f is None:
                raise ModelLoadError(f"{folder.path}: missing tensor {name!r}")
            if f not in handles:
                try:
                    handles[f] = stack.enter_context(safe_open(f, "pt"))
                except Exception as e:
                    raise ModelLoadError(f"{f}: cannot open safetensors file ({e})") from None
            try:
                return handles[f].get_tensor(name)
            except Exception as e:
                raise ModelLoadError(f"{f}: cannot read tensor {name!r} ({e})") from None

        def cat(*names: str) -> torch.Tensor:
            return torch.cat([get(n).to(dtype) for n in names], dim=0)

        yield "embed_tokens.weight", get("model.embed_tokens.weight").to(dtype)
        for i in range(cfg.num_layers):
            p, o = f"model.layers.{i}.", f"layers.{i}."
            a = p + "self_attn."
            yield o + "input_norm.weight", get(p + "input_layernorm.weight").to(dtype)
            yield o + "post_attn_norm.weight", get(p + "post_attention_layernorm.weight").to(dtype)
            yield o + "attn.qkv_proj.weight", cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")
            if cfg.attention_bias:
                yield o + "attn.qkv_proj.bias", cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
            if cfg.qk_norm:
                yield o + "attn.q_norm.weight", get(a + "q_norm.weight").to(dtype)
                yield o + "attn.k_norm.weight", get(a + "k_norm.weight").to(dtype)
            yield o + "attn.o_proj.weight", get(a + "o_proj.weight").to(dtype)
            yield o + "mlp.gate_up_proj.weight", cat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            yield o + "mlp.down_proj.weight", get(p + "mlp.down_proj.weight").to(dtype)
        yield "norm.weight", get("model.norm.weight").to(dtype)
        if not cfg.tie_word_embeddings:
            yield "lm_head.weight", get("lm_head.weight").to(dtype)


def describe(path: Path) -> ModelDescription:
    """Describe a Hugging Face folder from ``config.json``, ``tokenizer_config.json`` and the safetensors
    headers (no tensor is read)."""
    folder = HFModelFolder(path)
    tok_config = folder.tokenizer_config()
    dtype_bytes = folder.dtype_bytes()
    return ModelDescription(
        format="hf",
        path=path,
        config=folder.config(),
        tensor_bytes=dtype_bytes,
        chat_template=bool(tok_config.get("chat_template")) or (path / "chat_template.jinja").is_file(),
        source_info={"dtype_bytes": dtype_bytes},
        make_tokenizer=lambda: Tokenizer.from_hf_folder(path, tok_config, folder.raw_config),
        handle=folder,
    )


def load(desc: ModelDescription, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Read, fuse and cast the folder's tensors one at a time, then assign them to a meta-built model."""
    folder = desc.handle if isinstance(desc.handle, HFModelFolder) else HFModelFolder(desc.path)
    cfg = desc.config
    tok = desc.tokenizer()
    state = dict(iter_hf_state_dict(folder, cfg, dtype))
    m = materialize(cfg, state, device, where=str(desc.path))
    check_vocab(cfg, tok, desc.path)
    return LoadedModel(m, cfg, tok, desc.path, "hf", False, 0.0, dict(desc.source_info))
