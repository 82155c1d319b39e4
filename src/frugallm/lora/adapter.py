"""A PEFT LoRA adapter folder read into per-projection low-rank factors, checked against the model's shapes.

PEFT names a weight ``base_model.model.model.layers.{L}.self_attn.q_proj.lora_A.weight`` (``[r, in]``),
``...lora_B.weight`` (``[out, r]``) and, for DoRA, ``...lora_magnitude_vector`` (``[out]``). frugallm fuses q/k/v
and gate/up into one linear each, so each Hugging Face projection maps to a row range of a fused module
(:data:`PROJECTIONS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from frugallm.config import ModelConfig
from frugallm.errors import FrugalError
from frugallm.lora.config import MAX_RANK, AdapterConfig

# Hugging Face projection -> (frugallm fused module, index of its row range in FUSED[module]).
PROJECTIONS: dict[str, tuple[str, int]] = {
    "q_proj": ("attn.qkv_proj", 0),
    "k_proj": ("attn.qkv_proj", 1),
    "v_proj": ("attn.qkv_proj", 2),
    "o_proj": ("attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
                  r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def fused_layout(cfg: ModelConfig) -> dict[str, tuple[int, list[int]]]:
    """Per fused module: its input features and the output sizes of its row ranges (in order)."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "attn.qkv_proj": (h, [q, kv, kv]),
        "attn.o_proj": (q, [h]),
        "mlp.gate_up_proj": (h, [inter, inter]),
        "mlp.down_proj": (inter, [h]),
    }


@dataclass(frozen=True)
class LoraWeights:
    """One projection's factors: ``delta(x) = x @ a.T @ b.T`` with the scaling folded into ``b``.

    ``a [r, in]``, ``b [out, r]`` (fp32); ``magnitude [out]`` for DoRA, else None."""

    a: torch.Tensor
    b: torch.Tensor
    magnitude: torch.Tensor | None


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter read from ``path``: ``weights[(layer, module, part)]`` (see :data:`PROJECTIONS`)."""

    path: Path
    config: AdapterConfig
    rank: int  # the largest rank of its projections
    weights: dict[tuple[int, str, int], LoraWeights]

    @classmethod
    def load(cls, path: str | Path, cfg: ModelConfig) -> LoraAdapter:
        """Read and check an adapter folder for a model of ``cfg``; every mismatch is a ``FrugalError``."""
        folder = Path(path)
        if not folder.is_dir():
            raise FrugalError(f"LoRA adapter {str(path)!r} is not a folder (expected a PEFT adapter folder)")
        acfg = AdapterConfig.read(folder)
        tensors = _read_tensors(folder)
        layout = fused_layout(cfg)
        parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _KEY.search(key)
            if m is None or m.group(2) not in PROJECTIONS:
                raise FrugalError(f"{folder}: tensor {key!r} targets a module frugallm cannot adapt (LoRA runs on "
                                  f"the projections {', '.join(PROJECTIONS)})")
            layer = int(m.group(1))
            if layer >= cfg.num_layers:
                raise FrugalError(f"{folder}: tensor {key!r} is for layer {layer}, the model has {cfg.num_layers}")
            parts.setdefault((layer, m.group(2)), {})[m.group(3)] = t.float()
        if not parts:
            raise FrugalError(f"{folder}: adapter_model.safetensors holds no LoRA weights")
        weights: dict[tuple[int, str, int], LoraWeights] = {}
        for (layer, proj), p in sorted(parts.items()):
            module, part = PROJECTIONS[proj]
            fan_in, outs = layout[module]
            where = f"{folder}: layers.{layer}.{proj}"
            if "lora_A.weight" not in p or "lora_B.weight" not in p:
                raise FrugalError(f"{where} has {sorted(p)} but needs both lora_A and lora_B")
            a, b, mag = p["lora_A.weight"], p["lora_B.weight"], p.get("lora_magnitude_vector")
            r = a.shape[0] if a.dim() == 2 else -1
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or not 1 <= r <= MAX_RANK:
                raise FrugalError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not [r, in] / "
                                  f"[out, r] factors of one rank in [1, {MAX_RANK}]")
            if a.shape[1] != fan_in or b.shape[0] != outs[part]:
                raise FrugalError(f"{where}: adapter shape [{b.shape[0]}, {a.shape[1]}] does not match the base "
                                  f"model's [{outs[part]}, {fan_in}] (an adapter for another model?)")
            if acfg.use_dora != (mag is not None):
                raise FrugalError(f"{where}: use_dora={acfg.use_dora} but lora_magnitude_vector is "
                                  f"{'present' if mag is not None else 'missing'}")
            if mag is not None and mag.shape != (outs[part],):
                raise FrugalError(f"{where}: lora_magnitude_vector {tuple(mag.shape)}, expected ({outs[part]},)")
            if not all(bool(torch.isfinite(t).all()) for t in (a, b) + (() if mag is None else (mag,))):
                raise FrugalError(f"{where}: non-finite values in the adapter weights")
            weights[(layer, module, part)] = LoraWeights(a.contiguous(), (b * acfg.scaling(r)).contiguous(), mag)
        return cls(folder, acfg, max(w.a.shape[0] for w in weights.values()), weights)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        found = "adapter_model.bin (pickle; convert it to safetensors)" if (folder / "adapter_model.bin").exists() \
            else "no weights file"
        raise FrugalError(f"{folder}: expected adapter_model.safetensors, found {found}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FrugalError(f"cannot read {path}: {e}") from None
