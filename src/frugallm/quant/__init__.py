"""Weight quantization: int8, LLM.int8(), group-wise int2/3/4/6/8, GPTQ, auto4 and mix4.

Map of the package (each module imports only those listed above it):

* ``spec.py``: :class:`QuantSpec` and :func:`parse_quant_spec` (``"int4:group=32:head"``).
* ``packing.py``: bit-packing of 2/3/4/6/8-bit codes into ``uint8``.
* ``groups.py``: group-wise maths: group scales/offsets, codes, dequantization, round-to-nearest.
* ``kernels.py``: torch packed kernels (int8/int4 weight-only, int8 x int8), their shape rules and layouts.
* ``layer.py``: what every quantized linear shares (input flattening, output dtype/shape, bias, bytes).
* ``int8.py``: :class:`Int8Linear` (per-channel int8, weight only).
* ``llm_int8.py``: :class:`LLMInt8Linear` (LLM.int8(): int8 x int8 with outlier decomposition).
* ``group_linear.py``: :class:`GroupQuantLinear` (group-wise int2-8, int4 kernel layouts).
* ``mix4.py``: :class:`Mix4Linear` (per-group choice of 4-bit data type).
* ``gguf_linear.py``: :class:`GGUFLinear` (GGUF weights run in their stored ggml blocks).
* ``embedding.py``: :class:`QuantEmbedding` (shared with a tied ``lm_head``).
* ``gptq.py``: GPTQ's weight algorithm: one matrix and its Hessian -> group codes.
* ``methods.py``: the ``QUANT_METHODS`` registry; each method has ``quantize`` and ``convert``.
* ``targets.py``: which linears and embeddings a spec replaces (tied heads included).
* ``calibrate.py``: the GPTQ model driver: Hessians from calibration batches, block by block.
* ``apply.py``: :func:`quantize_model`, :func:`quantized_weight_bytes`.
* ``storage.py``: quantized folders (save / load packed safetensors).
* ``commands.py``: the ``frugallm quantize`` command.
"""

from frugallm.quant.apply import quantize_model, quantized_weight_bytes
from frugallm.quant.calibrate import gptq_quantize_model
from frugallm.quant.embedding import QuantEmbedding
from frugallm.quant.group_linear import GroupQuantLinear
from frugallm.quant.int8 import Int8Linear
from frugallm.quant.llm_int8 import LLMInt8Linear
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
