"""GGUF v3 files: model config, weights in the Hugging Face layout, tokenizer metadata.

Uses the llama.cpp project's ``gguf`` package; every tensor type ``gguf.quants.dequantize`` knows
(F32, F16, BF16, Q4_0 ... Q8_0, K-quants, IQ-quants) loads, dequantized to the engine's dtype.
Tensors are read and converted one at a time (:func:`iter_gguf_state_dict`), so a per-tensor choice
(keep the stored blocks, or dequantize) has one place to go; the whole fp32 state dict never exists.
Converted weights go to the weights cache (``weight_cache.py``) so later loads skip conversion.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugallm.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from frugallm.errors import ModelLoadError
from frugallm.loading import weight_cache
from frugallm.loading.base import LoadedModel, ModelDescription, check_vocab, materialize
from frugallm.tokenizer.tokenizer import Tokenizer, TokenizerMeta

_GGUF_MAGIC = b"GGUF"


def _open_reader(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on corrupt headers
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF header ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} needs bytes up to offset {end} but the file has {size} "
                "(truncated or wrong tensor offsets)"
            )
    return reader


class GGUFModelFile:
    """An opened GGUF file (memory-mapped; nothing is read until asked)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise ModelLoadError(f"{self.path}: cannot read metadata {key!r}: {e}") from None

    @property
    def arch(self) -> str:
        arch = self.field("general.architecture")
        if arch is None:
            raise ModelLoadError(f"{self.path}: GGUF has no general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{self.path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        return arch

    def config(self) -> ModelConfig:
        a = self.arch

        def req(key: str) -> Any:
            v = self.field(f"{a}.{key}")
            if v is None:
                raise ModelLoadError(f"{self.path}: missing GGUF metadata {a}.{key}")
            return v

        hidden, heads = int(req("embedding_length")), int(req("attention.head_count"))
        kv_heads = self.field(f"{a}.attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer lists exist in some files; all equal here
            kv_heads = kv_heads[0]
        head_dim = int(self.field(f"{a}.attention.key_length", hidden // heads))
        vocab = self.field(f"{a}.vocab_size")
        if vocab is None:
            emb = self.tensors.get("token_embd.weight")
            if emb is None:
                raise ModelLoadError(f"{self.path}: no token_embd.weight tensor")
            vocab = int(emb.shape[1])
        scaling = None
        if self.field(f"{a}.rope.scaling.type") == "linear":
            scaling = RopeScaling(rope_type="linear", factor=float(self.field(f"{a}.rope.scaling.factor", 1.0)))
        return ModelConfig(
            arch=a,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(req("feed_forward_length")),
            num_layers=int(req("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            max_position_embeddings=int(self.field(f"{a}.context_length", 2048)),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in self.tensors,
            attention_bias="blk.0.attn_q.bias" in self.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in self.tensors,
            name=str(self.field("general.name", "")),
        )

    def tensor(self, name: str) -> np.ndarray:
        """Dequantize one tensor to float32, numpy shape ``[rows, cols]`` (torch Linear layout)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: missing tensor {name!r}")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        try:
            if t.tensor_type == GGMLQuantizationType.F32:
                arr = np.array(t.data, dtype=np.float32)  # copy: the memmap is read-only
            else:
                arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        return np.asarray(arr, dtype=np.float32).reshape(shape)

    def tensor_type_bytes(self) -> dict[str, int]:
        """Bytes per GGML tensor type (for ``frugallm info``)."""
        out: dict[str, int] = {}
        for t in self.reader.tensors:
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + int(t.n_bytes)
        return out

    def tokenizer_meta(self) -> TokenizerMeta:
        def opt_int(key: str) -> int | None:
            v = self.field(key)
            return None if v is None else int(v)

        tokens = self.field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"{self.path}: GGUF has no tokenizer (tokenizer.ggml.tokens)")
        return TokenizerMeta(
            model=str(self.field("tokenizer.ggml.model", "gpt2")),
            pre=str(self.field("tokenizer.ggml.pre", "default")),
            tokens=list(tokens),
            token_types=list(self.field("tokenizer.ggml.token_type", [1] * len(tokens))),
            merges=list(self.field("tokenizer.ggml.merges", [])),
            scores=list(self.field("tokenizer.ggml.scores", [])),
            bos_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_id=opt_int("tokenizer.ggml.eos_token_id"),
            eot_id=opt_int("tokenizer.ggml.eot_token_id"),
            pad_id=opt_int("tokenizer.ggml.padding_token_id"),
            unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(self.field("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(self.field("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(self.field("tokenizer.ggml.add_space_prefix", True)),
            chat_template=self.field("tokenizer.chat_template"),
        )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its converter interleaves rotary pairs per head)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_state_dict(gf: GGUFModelFile, cfg: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` pairs in frugallm's parameter names, fused and in HF layout."""
    permute = cfg.arch in ("llama", "mistral")  # qwen2/qwen3 GGUFs keep the HF (NeoX) layout

    def get(name: str, n_head: int | None = None) -> np.ndarray:
        arr = gf.tensor(name)
        return _unpermute(arr, n_head) if (permute and n_head) else arr

    def t(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)

    yield "embed_tokens.weight", t(gf.tensor("token_embd.weight"))
    for i in range(cfg.num_layers):
        p, o = f"blk.{i}.", f"layers.{i}."
        yield o + "input_norm.weight", t(gf.tensor(p + "attn_norm.weight"))
        yield o + "post_attn_norm.weight", t(gf.tensor(p + "ffn_norm.weight"))
        qkv = [
            get(p + "attn_q.weight", cfg.num_heads),
            get(p + "attn_k.weight", cfg.num_kv_heads),
            get(p + "attn_v.weight"),
        ]
        yield o + "attn.qkv_proj.weight", t(np.concatenate(qkv, axis=0))
        if cfg.attention_bias:
            b = [
                get(p + "attn_q.bias", cfg.num_heads),
                get(p + "attn_k.bias", cfg.num_kv_heads),
                get(p + "attn_v.bias"),
            ]
            yield o + "attn.qkv_proj.bias", t(np.concatenate(b, axis=0))
        if cfg.qk_norm:
            yield o + "attn.q_norm.weight", t(gf.tensor(p + "attn_q_norm.weight"))
            yield o + "attn.k_norm.weight", t(gf.tensor(p + "attn_k_norm.weight"))
        yield o + "attn.o_proj.weight", t(gf.tensor(p + "attn_output.weight"))
        gate_up = [gf.tensor(p + "ffn_gate.weight"), gf.tensor(p + "ffn_up.weight")]
        yield o + "mlp.gate_up_proj.weight", t(np.concatenate(gate_up, axis=0))
        yield o + "mlp.down_proj.weight", t(gf.tensor(p + "ffn_down.weight"))
    yield "norm.weight", t(gf.tensor("output_norm.weight"))
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", t(gf.tensor("output.weight"))
    if "rope_freqs.weight" in gf.tensors:
        yield "rope_factors", torch.from_numpy(gf.tensor("rope_freqs.weight").reshape(-1).copy())


def gguf_num_tensors(cfg: ModelConfig) -> int:
    per_layer = 6 + (1 if cfg.attention_bias else 0) + (2 if cfg.qk_norm else 0)
    return 2 + cfg.num_layers * per_layer + (0 if cfg.tie_word_embeddings else 1)


# ------------------------------------------------------------------------------------- describe / load


def describe(path: Path, *, use_cache: bool = True) -> ModelDescription:
    """Describe a GGUF file. With ``use_cache``, what a previous conversion stored in the weights cache
    is used instead of parsing the file's metadata (the file is hashed once, then the hash is memoized)."""
    meta = weight_cache.find_meta(weight_cache.file_hash(path)) if use_cache else None
    if meta is not None:
        tok_dict = meta["tokenizer"]
        info = meta["source_info"]
        return ModelDescription(
            format="gguf",
            path=path,
            config=ModelConfig.from_dict(meta["config"]),
            tensor_bytes=info.get("tensor_type_bytes", {}),
            chat_template=tok_dict.get("chat_template") is not None,
            source_info=info,
            make_tokenizer=lambda: Tokenizer.from_dict(tok_dict),
        )
    gf = GGUFModelFile(path)
    type_bytes = gf.tensor_type_bytes()
    return ModelDescription(
        format="gguf",
        path=path,
        config=gf.config(),
        tensor_bytes=type_bytes,
        chat_template=gf.field("tokenizer.chat_template") is not None,
        source_info={"tensor_type_bytes": type_bytes, "file_bytes": path.stat().st_size},
        make_tokenizer=lambda: Tokenizer.from_gguf_meta(gf.tokenizer_meta()),
        handle=gf,
    )


def _progress(total: int, description: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import Progress

    p = Progress(transient=True)
    p.start()
    p.add_task(description, total=total)
    return p


def load(
    desc: ModelDescription, dtype: torch.dtype, device: torch.device, *, use_cache: bool = True, progress: bool = False
) -> LoadedModel:
    """Weights from the cache entry for ``dtype`` if there is one, else converted tensor by tensor
    (and cached)."""
    path, cfg = desc.path, desc.config
    entry = weight_cache.entry_dir(weight_cache.file_hash(path), dtype) if use_cache else None
    cached = weight_cache.load_entry(entry) if entry is not None else None
    if cached is not None:
        state, meta = cached
        m = materialize(cfg, state, device, where=str(path))
        return LoadedModel(m, cfg, desc.tokenizer(), path, "gguf", True, 0.0, meta["source_info"])

    tok = desc.tokenizer()
    check_vocab(cfg, tok, path)
    gf = desc.handle if isinstance(desc.handle, GGUFModelFile) else GGUFModelFile(path)
    bar = _progress(gguf_num_tensors(cfg), f"converting {path.name}", progress)
    state: dict[str, torch.Tensor] = {}
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
    m = materialize(cfg, state, device, where=str(path))
    return LoadedModel(m, cfg, tok, path, "gguf", False, 0.0, info)
