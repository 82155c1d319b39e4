"""Whole-model entry points: swap ``nn.Linear`` / ``nn.Embedding`` children for quantized modules in place.

Which modules are replaced is decided in ``targets.py``; how, by the method registered in ``methods.py``;
calibration methods (``gptq``) are driven through ``calibrate.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frugallm.errors import FrugalError
from frugallm.quant.calibrate import gptq_quantize_model
from frugallm.quant.embedding import QuantEmbedding
from frugallm.quant.methods import QUANT_METHODS
from frugallm.quant.spec import QuantSpec, as_spec
from frugallm.quant.targets import quantize_embeddings, target_linears


def quantize_model(
    model: nn.Module, spec: QuantSpec | str, calib: Callable[[], None] | None = None
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``calib`` is required by calibration methods (``gptq``): a callable that runs calibration batches
    through ``model`` (see :func:`frugallm.quant.calibrate.gptq_quantize_model`).
    """
    spec = as_spec(spec)
    method = QUANT_METHODS.get(spec.method)(spec)
    if method.needs_calibration:
        if not callable(calib):
            raise FrugalError(
                f"{spec.method} needs calibration: pass calib=a callable that runs calibration batches "
                "through the model"
            )
        return gptq_quantize_model(model, spec, calib)
    with torch.no_grad():
        quantize_embeddings(model, spec)
        for parent, name, linear in target_linears(model, spec):
            setattr(parent, name, head_module(linear, spec) if name == "lm_head" else method(linear))
    return model


def head_module(linear: nn.Linear, spec: QuantSpec) -> nn.Module:
    """An untied lm_head: the method itself, or the table width that ``head=BITS`` names."""
    if spec.embed_bits is None:
        return QUANT_METHODS.get(spec.method)(spec)(linear)
    return QuantEmbedding.table_from_weight(linear.weight.detach(), spec.embed_bits, bias=linear.bias)


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
