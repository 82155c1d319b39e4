"""GGUF v3 files: model config, weights in the Hugging Face layout, tokenizer metadata.

Two ways to load the weights (``loading.choose_weights`` picks one):

* ``"stored"`` (the CPU default for ``dtype="auto"``): every 2-D weight of a type ``csrc/gguf_linear.cpp``
  runs (:data:`NATIVE_TYPES`) becomes a :class:`GGUFLinear` over zero-copy views of the file's memmap (fused
  qkv / gate_up as row segments, llama Q/K rows un-permuted), the token embedding a :class:`QuantEmbedding`
  on the same blocks (a tied head is that very table). Only the rest (norms, biases, types the kernel lacks)
  is dequantized to fp32, one tensor at a time. Pages of the file come in as they are touched; nothing is
  cached. :func:`tensor_plan` says which tensor goes which way (``frugallm info`` shows it).
* ``"dequantize"``: every tensor type ``gguf.quants.dequantize`` knows (F32, F16, BF16, Q4_0 ... Q8_0,
  K-quants, IQ-quants) is converted to the engine's dtype, one at a time (:func:`iter_gguf_state_dict`;
  the whole fp32 state dict never exists), and the result goes to the weights cache (``weight_cache.py``)
  so later loads skip conversion.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugallm.config import ModelConfig
from frugallm.errors import ModelLoadError
from frugallm.loading import weight_cache
from frugallm.loading.base import LoadedModel, ModelDescription, check_vocab, materialize
from frugallm.loading.gguf_file import GGUFModelFile, check_file
from frugallm.quant.gguf_linear import NATIVE_TYPES
from frugallm.tokenizer.tokenizer import Tokenizer


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its converter interleaves rotary pairs per head)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permutes(cfg: ModelConfig) -> bool:
    return cfg.arch in ("llama", "mistral")  # qwen2/qwen3 GGUFs keep the HF (NeoX) layout


def linear_parts(cfg: ModelConfig) -> list[tuple[str, list[tuple[str, int | None]]]]:
    """Each linear of the model: ``(module path, [(GGUF tensor stem, heads to un-permute or None), ...])``,
    parts fused along the output dim in this order (the stem + ``.weight`` / ``.bias`` is the tensor)."""
    nq, nkv = (cfg.num_heads, cfg.num_kv_heads) if permutes(cfg) else (None, None)
    out: list[tuple[str, list[tuple[str, int | None]]]] = []
    for i in range(cfg.num_layers):
        p, o = f"blk.{i}.", f"layers.{i}."
        out += [
            (o + "attn.qkv_proj", [(p + "attn_q", nq), (p + "attn_k", nkv), (p + "attn_v", None)]),
            (o + "attn.o_proj", [(p + "attn_output", None)]),
            (o + "mlp.gate_up_proj", [(p + "ffn_gate", None), (p + "ffn_up", None)]),
            (o + "mlp.down_proj", [(p + "ffn_down", None)]),
        ]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head", [("output", None)]))
    return out


def tensor_plan(gf: GGUFModelFile, cfg: ModelConfig) -> dict[str, str]:
    """How an as-stored load runs each GGUF tensor: ``"stored"``, or ``"dequantized: <why>"`` (fp32 at load)."""
    plan: dict[str, str] = {}
    for name, t in gf.tensors.items():
        if len(t.shape) != 2 or name == "rope_freqs.weight":
            plan[name] = "dequantized: 1-D (norm, bias or rope factors)"
        elif t.tensor_type not in NATIVE_TYPES:
            plan[name] = f"dequantized: no as-stored kernel for {t.tensor_type.name}"
        else:
            plan[name] = "stored"
    for _, parts in linear_parts(cfg):  # one fused linear is stored whole or dequantized whole
        names = [stem + ".weight" for stem, _ in parts]
        odd = [n for n in names if plan.get(n, "stored") != "stored"]
        for n in names:
            if odd and plan.get(n) == "stored":
                plan[n] = f"dequantized: fused with {odd[0]} ({gf.tensors[odd[0]].tensor_type.name})"
    return plan


def plan_summary(gf: GGUFModelFile, plan: dict[str, str]) -> dict[str, dict[str, int]]:
    """``{"stored": {type: bytes}, "dequantized": {reason: tensors}}`` of a :func:`tensor_plan`."""
    stored: dict[str, int] = {}
    dequantized: dict[str, int] = {}
    for name, how in plan.items():
        t = gf.tensors[name]
        if how == "stored":
            stored[t.tensor_type.name] = stored.get(t.tensor_type.name, 0) + int(t.n_bytes)
        else:
            why = how.removeprefix("dequantized: ")
            dequantized[why] = dequantized.get(why, 0) + 1
    return {"stored": stored, "dequantized": dequantized}


def iter_gguf_state_dict(
    gf: GGUFModelFile, cfg: ModelConfig, dtype: torch.dtype, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` pairs in frugallm's parameter names, fused and in HF layout; names under a
    module path in ``skip`` (modules the as-stored load installs) are not read."""
    permute = permutes(cfg)

    def get(name: str, n_head: int | None = None) -> np.ndarray:
        arr = gf.tensor(name)
        return _unpermute(arr, n_head) if (permute and n_head) else arr

    def t(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)

    def wanted(name: str) -> bool:
        return name.rsplit(".", 1)[0] not in skip

    if wanted("embed_tokens.weight"):
        yield "embed_tokens.weight", t(gf.tensor("token_embd.weight"))
    for i in range(cfg.num_layers):
        p, o = f"blk.{i}.", f"layers.{i}."
        yield o + "input_norm.weight", t(gf.tensor(p + "attn_norm.weight"))
        yield o + "post_attn_norm.weight", t(gf.tensor(p + "ffn_norm.weight"))
        if wanted(o + "attn.qkv_proj.weight"):
            qkv = [
                get(p + "attn_q.weight", cfg.num_heads),
                get(p + "attn_k.weight", cfg.num_kv_heads),
                get(p + "attn_v.weight"),
            ]
            yield o + "attn.qkv_proj.weight", t(np.concatenate(qkv, axis=0))
            if cfg.attention_bias:
                yield o + "attn.qkv_proj.bias", t(qkv_bias(gf, cfg, i))
        if cfg.qk_norm:
            yield o + "attn.q_norm.weight", t(gf.tensor(p + "attn_q_norm.weight"))
            yield o + "attn.k_norm.weight", t(gf.tensor(p + "attn_k_norm.weight"))
        if wanted(o + "attn.o_proj.weight"):
            yield o + "attn.o_proj.weight", t(gf.tensor(p + "attn_output.weight"))
        if wanted(o + "mlp.gate_up_proj.weight"):
            gate_up = [gf.tensor(p + "ffn_gate.weight"), gf.tensor(p + "ffn_up.weight")]
            yield o + "mlp.gate_up_proj.weight", t(np.concatenate(gate_up, axis=0))
        if wanted(o + "mlp.down_proj.weight"):
            yield o + "mlp.down_proj.weight", t(gf.tensor(p + "ffn_down.weight"))
    yield "norm.weight", t(gf.tensor("output_norm.weight"))
    if not cfg.tie_word_embeddings and wanted("lm_head.weight"):
        yield "lm_head.weight", t(gf.tensor("output.weight"))
    if "rope_freqs.weight" in gf.tensors:
        yield "rope_factors", torch.from_numpy(gf.tensor("rope_freqs.weight").reshape(-1).copy())


def qkv_bias(gf: GGUFModelFile, cfg: ModelConfig, layer: int) -> np.ndarray:
    """Layer ``layer``'s fused q/k/v bias ``[q + 2 * kv]`` fp32 (Q/K un-permuted like their rows)."""
    p = f"blk.{layer}."
    heads = (cfg.num_heads, cfg.num_kv_heads, None) if permutes(cfg) else (None, None, None)
    parts = [gf.tensor(p + f"attn_{x}.bias") for x in "qkv"]
    return np.concatenate([_unpermute(b, h) if h else b for b, h in zip(parts, heads, strict=True)])


def gguf_num_tensors(cfg: ModelConfig) -> int:
    per_layer = 6 + (1 if cfg.attention_bias else 0) + (2 if cfg.qk_norm else 0)
    return 2 + cfg.num_layers * per_layer + (0 if cfg.tie_word_embeddings else 1)


# ------------------------------------------------------------------------------------- describe / load


def describe(path: Path, *, use_cache: bool = True) -> ModelDescription:
    """Describe a GGUF file. With ``use_cache``, what a previous conversion stored in the weights cache
    is used instead of parsing the file's metadata (the file is hashed once, then the hash is memoized)."""
    check_file(path)  # before hashing
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
    cfg = gf.config()
    return ModelDescription(
        format="gguf",
        path=path,
        config=cfg,
        tensor_bytes=type_bytes,
        chat_template=gf.field("tokenizer.chat_template") is not None,
        source_info={
            "tensor_type_bytes": type_bytes,
            "file_bytes": path.stat().st_size,
            "as_stored": plan_summary(gf, tensor_plan(gf, cfg)),
        },
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
    desc: ModelDescription,
    dtype: torch.dtype,
    device: torch.device,
    *,
    use_cache: bool = True,
    progress: bool = False,
) -> LoadedModel:
    """Weights from the cache entry for ``dtype`` if there is one, else converted tensor by tensor (and cached).
    (Weights run as stored load through :func:`frugallm.loading.gguf_stored.load_stored`.)"""
    path, cfg = desc.path, desc.config
    entry = weight_cache.entry_dir(weight_cache.file_hash(path), dtype) if use_cache else None
    cached = weight_cache.load_entry(entry) if entry is not None else None
    if cached is not None:
        state, meta = cached
        try:
            m = materialize(cfg, state, device, where=str(path))
        except ModelLoadError as e:  # an entry that checks out but does not fit the model: rebuild it
            weight_cache.discard(entry, str(e))
        else:
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
    info = {"tensor_type_bytes": gf.tensor_type_bytes(), "file_bytes": path.stat().st_size, "weights": "dequantize"}
    if entry is not None:
        weight_cache.save_entry(
            entry, state, {"config": cfg.to_dict(), "tokenizer": tok.to_dict(), "source_info": info}
        )
    m = materialize(cfg, state, device, where=str(path))
    return LoadedModel(m, cfg, tok, path, "gguf", False, 0.0, info)
