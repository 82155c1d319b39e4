"""Weight quantization: int8, LLM.int8(), group-wise int2/3/4/6/8, GPTQ, auto4 and mix4.

Map of the package:

* ``spec.py``: :class:`QuantSpec` and :func:`parse_quant_spec` (``"int4:group=32:head"``).
* ``packing.py``: bit-packing of 2/3/4/6/8-bit codes into ``uint8``.
* ``kernels.py``: torch packed kernels (int8/int4 weight-only, int8 x int8), their shape rules and layouts.
* ``linear.py``: :class:`Int8Linear`, :class:`LLMInt8Linear`, :class:`GroupQuantLinear`.
* ``mix4.py``: :class:`Mix4Linear` (per-group choice of 4-bit data type).
* ``embedding.py``: :class:`QuantEmbedding` (shared with a tied ``lm_head``).
* ``methods.py``: the ``QUANT_METHODS`` registry; each method has ``quantize`` and ``convert``.
* ``gptq.py``: GPTQ, driven block by block through a calibration callable.
* ``apply.py``: :func:`quantize_model`, :func:`quantized_weight_bytes`.
"""

from frugallm.quant.apply import quantize_model, quantized_weight_bytes
from frugallm.quant.embedding import QuantEmbedding
from frugallm.quant.gptq import gptq_quantize_model
from frugallm.quant.linear import GroupQuantLinear, Int8Linear, LLMInt8Linear
from frugallm.quant.methods import QUANT_METHODS, QuantMethod
from frugallm.quant.mix4 import Mix4Linear
from frugallm.quant.spec import QuantSpec, parse_quant_spec

__all__ = [
    "QUANT_METHODS",
    "GroupQuantLinear",
    "Int8Linear",
    "LLMInt8Linear",
    "Mix4Linear",
    "QuantEmbedding",
    "QuantMethod",
    "QuantSpec",
    "gptq_quantize_model",
    "parse_quant_spec",
    "quantize_model",
    "quantized_weight_bytes",
]
