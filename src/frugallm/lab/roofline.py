"""Analytic roofline model of Llama-family inference (in the style of LLM-Viewer).

``analyze`` counts FLOPs and memory bytes per operation for the prefill of ``prompt_len`` tokens and
for one decode step, and predicts each op's time as ``max(flops / peak, bytes / bandwidth)``: the
op is either compute- or memory-bound, never both, and ops run one after another.

Conventions (every count is for the whole batch):

* Linear layers: ``2 * tokens * in * out`` FLOPs; bytes = weights (``wbits``) + input and output
  activations (``abits``). Biases (qwen2) add ``tokens * out`` FLOPs.
* Attention is causal: prefill computes ``P(P+1)/2`` query-key pairs per head and sequence; a decode
  step at context ``c`` computes ``c`` pairs. Score and value matmuls use ``num_heads``; K/V traffic
  uses ``num_kv_heads`` (GQA): the K (resp. V) read of the cache and the write of the new tokens, at
  ``kvbits``, is counted in ``attn_score`` (resp. ``attn_value``). With ``fused_attention`` (flash
  attention, the default) the score matrix never reaches memory; without it, the full ``P x P`` (masked)
  score and probability matrices are written and read at ``abits``.
* Element-wise ops (softmax 5 FLOPs/element, SiLU*up 5, RMSNorm 4) run at the ``fp32`` (CUDA-core /
  vector) peak, not the tensor-core peak. RoPE, residual adds and the embedding gather are not counted
  (each is well under 1% of the FLOPs and bytes).
* ``lm_head``: prefill computes the logits of the last prompt token of each sequence only (that is all
  generation needs); every decode step computes ``batch`` logits rows.
* Decode is represented by one step at the average context ``prompt_len + gen_len / 2``; since every
  decode count is affine in the context, totals over the ``gen_len`` steps are ``gen_len`` times it.
* Weight-streaming bandwidth: the memory time of the weight matmuls (``*_proj``, ``lm_head``) uses the
  spec's *attainable* batch-1 GEMV bandwidth for the weight dtype (``hw.gemv_bandwidth_gbs``, probed) when
  it has one, else the peak ``mem_bandwidth_gbs``; every other op uses the peak. The report gives both
  predictions: ``ttft_s``/``tpot_s`` (attainable) and ``ttft_peak_s``/``tpot_peak_s`` (peak bandwidth
  everywhere, the pure hardware roofline). They are equal for datasheet specs.
* Matmuls run at the ``int8`` peak when both operands are <= 8 bits and the device lists ``int8``
  (weights: ``wbits``/``abits``; attention: ``kvbits``/``abits``), else at the phase's compute dtype:
  ``compute_dtype`` for decode, ``prefill_compute_dtype`` (default: the same) for prefill. They differ
  where an engine multiplies the two phases in different dtypes, e.g. frugallm's fp16 models on CPU
  prefill in bf16 (or fp32) but decode in fp16.

Measured runs are compared with this model in :mod:`frugallm.lab.utilization` (MBU, MFU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from frugallm.config import ModelConfig
from frugallm.errors import FrugalError
from frugallm.lab.hardware import DTYPES, GEMV_DTYPES, HardwareSpec

VALID_BITS = (2, 3, 4, 6, 8, 16, 32)
SOFTMAX_FLOPS = 5  # max, subtract, exp, sum, divide per score
ACT_FLOPS = 5  # SiLU (negate, exp, add, divide) and the multiply by ``up``, per element
NORM_FLOPS = 4  # square, accumulate, scale by rsqrt, multiply by the weight, per element

WEIGHT_OPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
OP_NAMES = ("qkv_proj", "attn_score", "attn_softmax", "attn_value", "o_proj", "gate_up_proj",
            "act_mul", "down_proj", "norms", "lm_head")


@dataclass(frozen=True)
class OpRow:
    """One operation of one phase. ``layer_*`` is one transformer layer (0 for ``lm_head``);
    ``flops``/``bytes``/``time_s`` cover all layers plus once-per-model parts (final norm, lm_head)."""

    name: str
    phase: str  # "prefill" | "decode"
    layer_flops: float
    layer_bytes: float
    flops: float
    bytes: float
    intensity: float  # FLOP/byte; inf when the op touches no memory (fused softmax)
    bound: str  # "memory" | "compute"
    peak_dtype: str  # which peak_flops entry bounds it
    time_s: float

    @property
    def achieved_flops(self) -> float:
        """FLOP/s if the op runs exactly at its roofline."""
        return self.flops / self.time_s if self.time_s else 0.0


@dataclass(frozen=True)
class PhaseReport:
    """All ops of a phase: the whole prefill, or one decode step."""

    phase: str
    tokens: int  # new tokens processed (batch * prompt_len, or batch)
    context: float  # keys attended by the last (prefill) or average (decode) token
    rows: tuple[OpRow, ...]
    flops: float
    bytes: float
    time_s: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf

    def row(self, name: str) -> OpRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)


@dataclass(frozen=True)
class RooflineReport:
    """Predicted cost of serving ``batch`` sequences of ``prompt_len`` + ``gen_len`` tokens."""

    model: str
    hardware: str
    batch: int
    prompt_len: int
    gen_len: int
    wbits: int
    abits: int
    kvbits: int
    compute_dtype: str  # decode's
    matmul_dtype: str  # the dtype whose peak bounds decode's weight matmuls
    prefill_compute_dtype: str
    prefill_matmul_dtype: str  # the dtype whose peak bounds prefill's weight matmuls
    weight_dtype: str | None  # the dtype whose attainable GEMV bandwidth bounds weight streaming
    weight_bandwidth_gbs: float  # that bandwidth (mem_bandwidth_gbs when the spec has none for it)
    fused_attention: bool
    num_params: int
    prefill: PhaseReport
    decode: PhaseReport  # one representative step
    decode_total_flops: float
    decode_total_bytes: float
    decode_total_time_s: float
    ttft_s: float  # predicted time to first token = prefill time (attainable GEMV bandwidth)
    tpot_s: float  # predicted time per output token = one decode step (attainable GEMV bandwidth)
    ttft_peak_s: float  # the same at the peak memory bandwidth (hardware roofline)
    tpot_peak_s: float
    decode_tokens_per_s: float  # whole batch: batch / tpot_s
    e2e_latency_s: float  # ttft_s + decode_total_time_s
    weight_bytes: float
    kv_cache_bytes: float  # at the final length prompt_len + gen_len
    activation_peak_bytes: float  # rough: largest live intermediates plus the residual stream
    total_memory_bytes: float
    fits_in_memory: bool | None  # None when the spec has no memory size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ counting


def _check_inputs(batch: int, prompt_len: int, gen_len: int, bits: dict[str, int],
                  compute_dtypes: tuple[str, ...]) -> None:
    if batch < 1:
        raise FrugalError(f"roofline: batch must be >= 1, got {batch}")
    if prompt_len < 1:
        raise FrugalError(f"roofline: prompt_len must be >= 1, got {prompt_len}")
    if gen_len < 0:
        raise FrugalError(f"roofline: gen_len must be >= 0, got {gen_len}")
    for name, value in bits.items():
        if value not in VALID_BITS:
            raise FrugalError(
                f"roofline: {name}={value} is not supported; "
                f"valid bit widths: {', '.join(map(str, VALID_BITS))}"
            )
    for compute_dtype in compute_dtypes:
        if compute_dtype not in DTYPES:
            raise FrugalError(f"roofline: unknown compute_dtype {compute_dtype!r}; valid: {', '.join(DTYPES)}")


def _pick_dtype(hw: HardwareSpec, compute_dtype: str, a: int, b: int) -> str:
    if a <= 8 and b <= 8 and "int8" in hw.peak_flops:
        return "int8"
    hw.peak(compute_dtype)  # raises a FrugalError naming the dtypes the spec has
    return compute_dtype


def _make_row(name: str, phase: str, layer: tuple[float, float], once: tuple[float, float],
              num_layers: int, hw: HardwareSpec, dtype: str, bandwidth: float) -> OpRow:
    flops = num_layers * layer[0] + once[0]
    nbytes = num_layers * layer[1] + once[1]
    compute_t, memory_t = flops / hw.peak(dtype), nbytes / bandwidth
    return OpRow(
        name=name, phase=phase, layer_flops=layer[0], layer_bytes=layer[1], flops=flops, bytes=nbytes,
        intensity=flops / nbytes if nbytes else math.inf,
        bound="compute" if compute_t >= memory_t else "memory",
        peak_dtype=dtype, time_s=max(compute_t, memory_t),
    )


def _phase(cfg: ModelConfig, hw: HardwareSpec, phase: str, batch: int, new: int, context: float,
           bits: tuple[int, int, int], dtypes: tuple[str, str, str], fused: bool,
           weight_bw: float) -> PhaseReport:
    """Rows of one phase: ``new`` tokens per sequence attending causally up to ``context`` keys.
    Weight matmuls stream at ``weight_bw`` bytes/s, everything else at ``hw.mem_bandwidth``."""
    h, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    heads, d, q, kv = cfg.num_heads, cfg.head_dim, cfg.q_size, cfg.kv_size
    wb, ab, kb = (b / 8 for b in bits)
    mm, attn_mm, vec = dtypes
    n = batch * new
    prefill = phase == "prefill"
    pairs = context * (context + 1) / 2 if prefill else context  # query-key dot products per head
    score_elems = context * context if prefill else context  # an unfused kernel stores the full matrix
    scores = 0.0 if fused else batch * heads * score_elems * ab
    kv_read = context  # cached (decode) or fresh (prefill) keys read per sequence
    kv_traffic = batch * (kv_read + new) * kv * kb  # K (or V): read + write the new tokens
    qkv_out = q + 2 * kv
    bias = qkv_out if cfg.attention_bias else 0
    qk_norm = (NORM_FLOPS * n * (q + kv), 2 * d * wb + 2 * n * (q + kv) * ab) if cfg.qk_norm else (0, 0)
    layer = {
        "qkv_proj": (2 * n * h * qkv_out + n * bias, (h * qkv_out + bias) * wb + n * (h + qkv_out) * ab, mm),
        "attn_score": (2 * batch * heads * pairs * d, n * q * ab + kv_traffic + scores, attn_mm),
        "attn_softmax": (SOFTMAX_FLOPS * batch * heads * pairs, 2 * scores, vec),
        "attn_value": (2 * batch * heads * pairs * d, scores + kv_traffic + n * q * ab, attn_mm),
        "o_proj": (2 * n * q * h, q * h * wb + n * (q + h) * ab, mm),
        "gate_up_proj": (2 * n * h * 2 * inter, 2 * h * inter * wb + n * (h + 2 * inter) * ab, mm),
        "act_mul": (ACT_FLOPS * n * inter, 3 * n * inter * ab, vec),
        "down_proj": (2 * n * inter * h, inter * h * wb + n * (inter + h) * ab, mm),
        "norms": (2 * NORM_FLOPS * n * h + qk_norm[0], 2 * (h * wb + 2 * n * h * ab) + qk_norm[1], vec),
        "lm_head": (0.0, 0.0, mm),
    }
    once = {
        "norms": (NORM_FLOPS * n * h, h * wb + 2 * n * h * ab),  # final norm, over every token
        "lm_head": (2 * batch * h * vocab, h * vocab * wb + batch * (h + vocab) * ab),  # one row per seq
    }
    rows = tuple(
        _make_row(name, phase, (f, b), once.get(name, (0.0, 0.0)), cfg.num_layers, hw, dt,
                  weight_bw if name in WEIGHT_OPS else hw.mem_bandwidth)
        for name, (f, b, dt) in layer.items()
    )
    return PhaseReport(phase=phase, tokens=n, context=context, rows=rows,
                       flops=sum(r.flops for r in rows), bytes=sum(r.bytes for r in rows),
                       time_s=sum(r.time_s for r in rows))


def _weight_dtype(wbits: int, compute_dtype: str, weight_dtype: str | None) -> str | None:
    if weight_dtype is not None:
        if weight_dtype not in GEMV_DTYPES:
            raise FrugalError(f"roofline: unknown weight_dtype {weight_dtype!r}; valid: {', '.join(GEMV_DTYPES)}")
        return weight_dtype
    if wbits == 32:
        return "fp32"
    if wbits == 16:
        return compute_dtype if compute_dtype in ("bf16", "fp16") else "fp16"
    return None


def _activation_peak(cfg: ModelConfig, batch: int, new: int, context: float, abits: int,
                     fused: bool) -> float:
    """Largest set of intermediates alive at once (one op's inputs + outputs) + the residual stream."""
    n, h = batch * new, cfg.hidden_size
    score_elems = context * context if new > 1 else context
    live = max(
        n * (h + cfg.q_size + 2 * cfg.kv_size),  # qkv_proj
        2 * n * cfg.q_size + (0 if fused else 2 * batch * cfg.num_heads * score_elems),  # attention
        n * (h + 3 * cfg.intermediate_size),  # gate_up + act_mul
        batch * (h + cfg.vocab_size),  # lm_head
    )
    return (n * h + live) * abits / 8


def analyze(cfg: ModelConfig, hw: HardwareSpec, batch: int, prompt_len: int, gen_len: int,
            wbits: int = 16, abits: int = 16, kvbits: int = 16, compute_dtype: str = "fp16",
            fused_attention: bool = True, weight_dtype: str | None = None,
            prefill_compute_dtype: str | None = None) -> RooflineReport:
    """Predict per-op FLOPs, bytes and time for prefill and decode (see the module docstring).

    ``compute_dtype`` is the dtype decode multiplies in and ``prefill_compute_dtype`` the one prefill
    does (None: the same), so each phase's time and MFU use the peak of the dtype it really runs in.
    ``weight_dtype`` picks the attainable GEMV bandwidth (``fp32``/``bf16``/``fp16``); by default it is
    ``fp32`` for 32-bit weights and, for 16-bit weights, ``compute_dtype`` if that is bf16/fp16 else fp16.
    Other bit widths (quantized kernels, not probed) stream at the peak bandwidth.

    Raises :class:`FrugalError` for batch < 1, prompt_len < 1, gen_len < 0, a bit width outside
    ``VALID_BITS`` or a compute dtype the spec has no peak for.
    """
    bits_by_name = {"wbits": wbits, "abits": abits, "kvbits": kvbits}
    prefill_compute = prefill_compute_dtype or compute_dtype
    _check_inputs(batch, prompt_len, gen_len, bits_by_name, (compute_dtype, prefill_compute))

    def dtypes(compute: str) -> tuple[str, str, str]:  # weight matmuls, attention matmuls, vector ops
        vec = "fp32" if "fp32" in hw.peak_flops else compute
        return _pick_dtype(hw, compute, wbits, abits), _pick_dtype(hw, compute, kvbits, abits), vec

    bits = (wbits, abits, kvbits)
    wdt = _weight_dtype(wbits, compute_dtype, weight_dtype)
    weight_bw = hw.gemv_bandwidth(wdt)
    ctx = prompt_len + gen_len / 2
    pre_dtypes, dec_dtypes = dtypes(prefill_compute), dtypes(compute_dtype)
    pre_args, dec_args = (bits, pre_dtypes, fused_attention), (bits, dec_dtypes, fused_attention)
    prefill = _phase(cfg, hw, "prefill", batch, prompt_len, prompt_len, *pre_args, weight_bw)
    decode = _phase(cfg, hw, "decode", batch, 1, ctx, *dec_args, weight_bw)
    if weight_bw == hw.mem_bandwidth:
        prefill_peak_t, decode_peak_t = prefill.time_s, decode.time_s
    else:
        prefill_peak_t = _phase(cfg, hw, "prefill", batch, prompt_len, prompt_len, *pre_args,
                                hw.mem_bandwidth).time_s
        decode_peak_t = _phase(cfg, hw, "decode", batch, 1, ctx, *dec_args, hw.mem_bandwidth).time_s

    weight_bytes = cfg.num_params * wbits / 8
    kv_bytes = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (prompt_len + gen_len) * batch
                * kvbits / 8)
    act_bytes = max(_activation_peak(cfg, batch, prompt_len, prompt_len, abits, fused_attention),
                    _activation_peak(cfg, batch, 1, prompt_len + gen_len, abits, fused_attention))
    total_mem = weight_bytes + kv_bytes + act_bytes
    return RooflineReport(
        model=cfg.name or f"{cfg.arch}-{cfg.num_params / 1e9:.2f}B", hardware=hw.name,
        batch=batch, prompt_len=prompt_len, gen_len=gen_len, wbits=wbits, abits=abits, kvbits=kvbits,
        compute_dtype=compute_dtype, matmul_dtype=dec_dtypes[0],
        prefill_compute_dtype=prefill_compute, prefill_matmul_dtype=pre_dtypes[0],
        weight_dtype=wdt, weight_bandwidth_gbs=weight_bw / 1e9,
        fused_attention=fused_attention,
        num_params=cfg.num_params, prefill=prefill, decode=decode,
        decode_total_flops=gen_len * decode.flops, decode_total_bytes=gen_len * decode.bytes,
        decode_total_time_s=gen_len * decode.time_s,
        ttft_s=prefill.time_s, tpot_s=decode.time_s, ttft_peak_s=prefill_peak_t, tpot_peak_s=decode_peak_t,
        decode_tokens_per_s=batch / decode.time_s,
        e2e_latency_s=prefill.time_s + gen_len * decode.time_s,
        weight_bytes=weight_bytes, kv_cache_bytes=kv_bytes, activation_peak_bytes=act_bytes,
        total_memory_bytes=total_mem,
        fits_in_memory=None if hw.mem_bytes is None else total_mem <= hw.mem_bytes,
    )
