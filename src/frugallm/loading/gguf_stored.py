"""GGUF weights run as stored: the load that installs the file's quantized tensors as :class:`GGUFLinear` /
:class:`QuantEmbedding` modules over its memmap (:func:`load_stored`). The reader, the config, which tensors run
as stored (``tensor_plan``) and the tensor-by-tensor conversion of everything else are in ``gguf.py``."""

from __future__ import annotations

from typing import Any

import torch
from gguf import GGML_QUANT_SIZES

from frugallm.config import ModelConfig
from frugallm.errors import ModelLoadError
from frugallm.loading.base import LoadedModel, ModelDescription, check_vocab, materialize
from frugallm.loading.gguf import iter_gguf_state_dict, linear_parts, plan_summary, qkv_bias, tensor_plan
from frugallm.loading.gguf_file import GGUFModelFile
from frugallm.quant.embedding import QuantEmbedding
from frugallm.quant.gguf_linear import GGUFLinear, segment_from_reader


def load_stored(desc: ModelDescription, dtype: torch.dtype, device: torch.device,
                act_quant: str | None = None) -> LoadedModel:
    """Quantized weights as :class:`GGUFLinear` / :class:`QuantEmbedding` modules over the file's memmap, the
    rest (:func:`tensor_plan`) dequantized to fp32; nothing is read from or written to the weights cache.
    ``act_quant="q8"``: the linears quantize decode's activations to int8 (see :class:`GGUFLinear`)."""
    if dtype != torch.float32:
        raise ModelLoadError(f"weights run as stored take fp32 activations, not {dtype}")
    path, cfg = desc.path, desc.config
    tok = desc.tokenizer()
    check_vocab(cfg, tok, path)
    gf = desc.handle if isinstance(desc.handle, GGUFModelFile) else GGUFModelFile(path)
    plan = tensor_plan(gf, cfg)
    modules: dict[str, torch.nn.Module] = {}
    for mod_path, parts in linear_parts(cfg):
        if plan.get(parts[0][0] + ".weight") != "stored":
            continue
        in_features, rows = _linear_shape(cfg, mod_path)
        segs = [
            segment_from_reader(_checked(gf, stem + ".weight", in_features, n), heads)
            for (stem, heads), n in zip(parts, rows, strict=True)
        ]
        bias = None
        if mod_path.endswith("qkv_proj") and cfg.attention_bias:
            bias = torch.from_numpy(qkv_bias(gf, cfg, int(mod_path.split(".")[1])))
        modules[mod_path] = GGUFLinear.from_segments(segs, in_features, bias, act_quant)
    if plan.get("token_embd.weight") == "stored":
        t = _checked(gf, "token_embd.weight", cfg.hidden_size, cfg.vocab_size)
        table = GGUFLinear.from_segments([segment_from_reader(t)], cfg.hidden_size, act_quant=act_quant)
        modules["embed_tokens"] = QuantEmbedding(table, torch.float32)
        if cfg.tie_word_embeddings:
            modules["lm_head"] = table  # the head multiplies the same blocks

    def install(model: torch.nn.Module) -> list[str]:
        for name, mod in modules.items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, mod)
        return list(modules)

    state = dict(iter_gguf_state_dict(gf, cfg, torch.float32, skip=frozenset(modules)))
    m = materialize(cfg, state, device, where=str(path), install=install)
    info = {
        "tensor_type_bytes": gf.tensor_type_bytes(),
        "file_bytes": path.stat().st_size,
        "weights": "stored" if act_quant is None else "stored-q8",
        "as_stored": plan_summary(gf, plan),
        "tensor_plan": plan,
    }
    return LoadedModel(m, cfg, tok, path, "gguf", False, 0.0, info)


def _linear_shape(cfg: ModelConfig, mod_path: str) -> tuple[int, list[int]]:
    """``(in_features, rows of each fused part)`` of the linear at ``mod_path`` (see :func:`linear_parts`)."""
    h, kind = cfg.hidden_size, mod_path.rsplit(".", 1)[-1]
    return {
        "qkv_proj": (h, [cfg.q_size, cfg.kv_size, cfg.kv_size]),
        "o_proj": (cfg.q_size, [h]),
        "gate_up_proj": (h, [cfg.intermediate_size, cfg.intermediate_size]),
        "down_proj": (cfg.intermediate_size, [h]),
        "lm_head": (h, [cfg.vocab_size]),
    }[kind]


def _checked(gf: GGUFModelFile, name: str, in_features: int, rows: int) -> Any:
    """The reader tensor ``name``, checked to be ``rows`` rows of ``in_features`` values whose bytes match its
    type: a mismatch is one error naming the tensor, never a kernel reading past its blocks."""
    t = gf.tensors.get(name)
    if t is None:
        raise ModelLoadError(f"{gf.path}: missing tensor {name!r}")
    shape = [int(d) for d in t.shape]
    if shape != [in_features, rows]:
        raise ModelLoadError(
            f"{gf.path}: tensor {name!r} has GGUF shape {shape}, the model config needs {[in_features, rows]}"
        )
    block, size = GGML_QUANT_SIZES[t.tensor_type]
    expected = rows * (in_features // block) * size
    if in_features % block or int(t.data.nbytes) != expected:
        raise ModelLoadError(
            f"{gf.path}: tensor {name!r} ({t.tensor_type.name}, shape {shape}) holds "
            f"{int(t.data.nbytes)} bytes; {rows} rows of {in_features} values take {expected}"
        )
    return t
