"""Quantization methods: small registered classes with two verbs.

``quantize(linear, hessian=None) -> state`` runs offline and returns tensors plus metadata;
``convert(state) -> nn.Module`` builds the runtime module that replaces the ``nn.Linear``.
``needs_calibration`` is a capability flag: such methods are driven by ``gptq_quantize_model``
(``calibrate.py``), which collects the Hessian each call needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from frugallm.errors import FrugalError
from frugallm.quant.gptq import gptq_quantize_weight
from frugallm.quant.group_linear import GroupQuantLinear
from frugallm.quant.groups import GroupQuantState, rtn_group_quantize
from frugallm.quant.int8 import Int8Linear, Int8State, quantize_int8_rows
from frugallm.quant.layer import bias_of
from frugallm.quant.llm_int8 import LLMInt8Linear
from frugallm.quant.mix4 import Mix4Linear, Mix4State, mix4_quantize
from frugallm.quant.spec import QuantSpec
from frugallm.registry import Registry


@dataclass(frozen=True)
class QuantMethod:
    """Base class; ``spec`` is the validated recipe."""

    spec: QuantSpec
    needs_calibration: ClassVar[bool] = False

    def quantize(self, linear: nn.Linear, hessian: torch.Tensor | None = None) -> Any:
        raise NotImplementedError

    def convert(self, state: Any) -> nn.Module:
        raise NotImplementedError

    def __call__(self, linear: nn.Linear, hessian: torch.Tensor | None = None) -> nn.Module:
        """``convert(quantize(linear))`` under ``no_grad``."""
        with torch.no_grad():
            return self.convert(self.quantize(linear, hessian))


QUANT_METHODS: Registry[type[QuantMethod]] = Registry("quantization method")


@QUANT_METHODS.register("int8")
@dataclass(frozen=True)
class Int8Method(QuantMethod):
    """Per-output-channel symmetric int8, weight only."""

    def quantize(self, linear: nn.Linear, hessian: torch.Tensor | None = None) -> Int8State:
        q, s = quantize_int8_rows(linear.weight.detach())
        return Int8State(q, s, bias_of(linear))

    def convert(self, state: Int8State) -> nn.Module:
        return Int8Linear(state)


@QUANT_METHODS.register("llm.int8")
@dataclass(frozen=True)
class LLMInt8Method(Int8Method):
    """Same stored weights as ``int8``; the runtime quantizes activations and splits outliers."""

    def convert(self, state: Int8State) -> nn.Module:
        return LLMInt8Linear(state, self.spec.threshold, self.spec.zeropoint)


@QUANT_METHODS.register("int")
@dataclass(frozen=True)
class IntMethod(QuantMethod):
    """Group-wise round-to-nearest at ``spec.bits`` bits."""

    def quantize(self, linear: nn.Linear, hessian: torch.Tensor | None = None) -> GroupQuantState:
        assert self.spec.group_size is not None
        state = rtn_group_quantize(linear.weight, self.spec.bits, self.spec.group_size, self.spec.symmetric)
        state.bias = bias_of(linear)
        return state

    def convert(self, state: GroupQuantState) -> nn.Module:
        return GroupQuantLinear(state)


def relative_error(weight: torch.Tensor, state: GroupQuantState) -> float:
    """``||W - deq(Q)||_F / ||W||_F``."""
    w = weight.detach().float()
    return float((state.dequantize() - w).norm() / w.norm().clamp(min=1e-12))


@QUANT_METHODS.register("auto4")
@dataclass(frozen=True)
class Auto4Method(IntMethod):
    """FineQuant-style adaptive granularity: per matrix, the coarsest group size in 128 -> 64 -> 32 whose
    relative weight reconstruction error is within ``spec.tol`` of the finest group's (error <= (1 + tol) x
    error at 32): coarse groups where they cost little, fine ones where a few large weights would stretch a
    coarse group's range. Groups that do not divide ``in_features`` are skipped.

    Relative to the finest group, not an absolute bound: an absolute 0.11 accepted groups of 64 and 128 on the
    default model, whose Q4_1 source sits exactly on a group-32 grid (perplexity +43 %).
    """

    candidates: ClassVar[tuple[int, ...]] = (128, 64, 32)

    def quantize(self, linear: nn.Linear, hessian: torch.Tensor | None = None) -> GroupQuantState:
        k = linear.in_features
        sizes = [g for g in self.candidates if k % g == 0]
        if not sizes:
            raise FrugalError(f"auto4 needs in_features divisible by 32; {linear} has {k}")
        states = [rtn_group_quantize(linear.weight, 4, g, self.spec.symmetric) for g in sizes]
        errors = [relative_error(linear.weight, st) for st in states]
        bound = (1.0 + self.spec.tol) * errors[-1]
        state = next(st for st, err in zip(states, errors, strict=True) if err <= bound)
        state.bias = bias_of(linear)
        return state


@QUANT_METHODS.register("mix4")
@dataclass(frozen=True)
class Mix4Method(QuantMethod):
    """BitMoD-style per-group choice among four 4-bit grids (see ``mix4.py``)."""

    def quantize(self, linear: nn.Linear, hessian: torch.Tensor | None = None) -> Mix4State:
        assert self.spec.group_size is not None
        state = mix4_quantize(linear.weight, self.spec.group_size)
        state.bias = bias_of(linear)
        return state

    def convert(self, state: Mix4State) -> nn.Module:
        return Mix4Linear(state)


@QUANT_METHODS.register("gptq")
@dataclass(frozen=True)
class GPTQMethod(IntMethod):
    """GPTQ (Frantar et al. 2022) with the Hessian ``2 X^T X`` of the layer's calibration inputs."""

    needs_calibration: ClassVar[bool] = True

    def quantize(self, linear: nn.Linear, hessian: torch.Tensor | None = None) -> GroupQuantState:
        if hessian is None:
            raise FrugalError("gptq needs calibration data: use gptq_quantize_model(model, spec, run_calib)")
        assert self.spec.group_size is not None
        state = gptq_quantize_weight(
            linear.weight, hessian, self.spec.bits, self.spec.group_size,
            symmetric=self.spec.symmetric, act_order=self.spec.act_order,
        )
        state.bias = bias_of(linear)
        return state
