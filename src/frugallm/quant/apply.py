"""Whole-model entry points: swap ``nn.Linear`` / ``nn.Embedding`` children for quantized modules in place.

Which modules: every ``nn.Linear`` except the one named ``lm_head`` (only with the ``head`` flag) and,
with the ``embed`` flag, every ``nn.Embedding``. A tied ``lm_head`` (same weight tensor as an embedding)
is never quantized separately: with either flag the embedding is quantized once and the head becomes
the same quantized table (see ``embedding.py``); with neither flag both stay in full precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frugallm.errors import FrugalError
from frugallm.quant.embedding import QuantEmbedding
from frugallm.quant.methods import QUANT_METHODS
from frugallm.quant.spec import QuantSpec, parse_quant_spec

Target = tuple[nn.Module, str, nn.Linear]  # (parent, attribute name, linear)


def as_spec(spec: QuantSpec | str) -> QuantSpec:
    return parse_quant_spec(spec) if isinstance(spec, str) else spec


def quantize_model(
    model: nn.Module, spec: QuantSpec | str, calib: Callable[[], None] | None = None
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``calib`` is required by calibration methods (``gptq``): a callable that runs calibration batches
    through ``model`` (see :func:`frugallm.quant.gptq.gptq_quantize_model`).
    """
    spec = as_spec(spec)
    method = QUANT_METHODS.get(spec.method)(spec)
    if method.needs_calibration:
        if not callable(calib):
            raise FrugalError(
                f"{spec.method} needs calibration: pass calib=a callable that runs calibration batches "
                "through the model"
            )
        from frugallm.quant.gptq import gptq_quantize_model

        return gptq_quantize_model(model, spec, calib)
    with torch.no_grad():
        quantize_embeddings(model, spec)
        for parent, name, linear in target_linears(model, spec):
            setattr(parent, name, head_module(linear, spec) if name == "lm_head" else method(linear))
    return model


def table_bits(spec: QuantSpec) -> int:
    """Bit width of embedding tables (and of tied heads): ``head=8`` / ``embed=8``, else by the method."""
    return spec.embed_bits or (8 if spec.bits >= 6 else 4)


def head_module(linear: nn.Linear, spec: QuantSpec) -> nn.Module:
    """An untied lm_head: the method itself, or the table width that ``head=BITS`` names."""
    if spec.embed_bits is None:
        return QUANT_METHODS.get(spec.method)(spec)(linear)
    return QuantEmbedding.table_from_weight(linear.weight.detach(), spec.embed_bits, bias=linear.bias)


def _find_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    for parent in model.modules():
        child = dict(parent.named_children()).get("lm_head")
        if isinstance(child, nn.Linear):
            return parent, child
    return None


def quantize_embeddings(model: nn.Module, spec: QuantSpec) -> None:
    """Replace embeddings (``embed`` flag) and tied heads (either flag) by :class:`QuantEmbedding` storage."""
    head = _find_head(model)
    bits = table_bits(spec)
    for parent in list(model.modules()):
        for name, emb in list(parent.named_children()):
            if not isinstance(emb, nn.Embedding):
                continue
            tied = head is not None and head[1].weight is emb.weight
            if not (spec.include_embeddings or (tied and spec.include_lm_head)):
                continue
            qemb = QuantEmbedding.from_embedding(emb, bits, spec.group_size)
            setattr(parent, name, qemb)
            if tied and head is not None:
                head_parent, head_linear = head
                if head_linear.bias is not None:
                    qemb.table.bias = head_linear.bias.detach().clone()
                head_parent.lm_head = qemb.table


def target_linears(model: nn.Module, spec: QuantSpec) -> list[Target]:
    """The ``nn.Linear`` children to quantize, in module order."""
    embed_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: list[Target] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if not isinstance(child, nn.Linear):
                continue
            if name == "lm_head" and (not spec.include_lm_head or id(child.weight) in embed_weights):
                continue
            out.append((parent, name, child))
    return out


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of weight storage: ``weight_bytes()`` of every quantized module plus all remaining parameters.

    Shared storage (tied head and embedding, tied parameters) is counted once; non-parameter buffers of
    unquantized modules (RoPE tables, KV caches) are not weights and are not counted.
    """
    total = 0
    for m in model.modules():  # modules() yields a shared module once
        if callable(getattr(m, "weight_bytes", None)) and not any(
            callable(getattr(c, "weight_bytes", None)) for c in m.children()
        ):
            total += m.weight_bytes()
    total += sum(p.numel() * p.element_size() for p in model.parameters())
    return total
