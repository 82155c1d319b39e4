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
  (weights: ``wbits``/``abits``; attention: ``kvbits``/``abits``), else at ``compute_dtype``.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from frugallm.config import ModelConfig
from frugallm.errors import FrugalError
from frugallm.lab.hwspecs import DTYPES, GEMV_DTYPES, HardwareSpec

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
    compute_dtype: str
    matmul_dtype: str  # the dtype whose peak bounds the weight matmuls
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
                  compute_dtype: str) -> None:
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
            fused_attention: bool = True, weight_dtype: str | None = None) -> RooflineReport:
    """Predict per-op FLOPs, bytes and time for prefill and decode (see the module docstring).

    ``weight_dtype`` picks the attainable GEMV bandwidth (``fp32``/``bf16``/``fp16``); by default it is
    ``fp32`` for 32-bit weights and, for 16-bit weights, ``compute_dtype`` if that is bf16/fp16 else fp16.
    Other bit widths (quantized kernels, not probed) stream at the peak bandwidth.

    Raises :class:`FrugalError` for batch < 1, prompt_len < 1, gen_len < 0, a bit width outside
    ``VALID_BITS`` or a compute dtype the spec has no peak for.
    """
    bits_by_name = {"wbits": wbits, "abits": abits, "kvbits": kvbits}
    _check_inputs(batch, prompt_len, gen_len, bits_by_name, compute_dtype)
    mm = _pick_dtype(hw, compute_dtype, wbits, abits)
    attn_mm = _pick_dtype(hw, compute_dtype, kvbits, abits)
    vec = "fp32" if "fp32" in hw.peak_flops else compute_dtype
    bits, dtypes = (wbits, abits, kvbits), (mm, attn_mm, vec)
    wdt = _weight_dtype(wbits, compute_dtype, weight_dtype)
    weight_bw = hw.gemv_bandwidth(wdt)
    ctx = prompt_len + gen_len / 2
    args = (bits, dtypes, fused_attention)
    prefill = _phase(cfg, hw, "prefill", batch, prompt_len, prompt_len, *args, weight_bw)
    decode = _phase(cfg, hw, "decode", batch, 1, ctx, *args, weight_bw)
    if weight_bw == hw.mem_bandwidth:
        prefill_peak_t, decode_peak_t = prefill.time_s, decode.time_s
    else:
        prefill_peak_t = _phase(cfg, hw, "prefill", batch, prompt_len, prompt_len, *args, hw.mem_bandwidth).time_s
        decode_peak_t = _phase(cfg, hw, "decode", batch, 1, ctx, *args, hw.mem_bandwidth).time_s

    weight_bytes = cfg.num_params * wbits / 8
    kv_bytes = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (prompt_len + gen_len) * batch
                * kvbits / 8)
    act_bytes = max(_activation_peak(cfg, batch, prompt_len, prompt_len, abits, fused_attention),
                    _activation_peak(cfg, batch, 1, prompt_len + gen_len, abits, fused_attention))
    total_mem = weight_bytes + kv_bytes + act_bytes
    return RooflineReport(
        model=cfg.name or f"{cfg.arch}-{cfg.num_params / 1e9:.2f}B", hardware=hw.name,
        batch=batch, prompt_len=prompt_len, gen_len=gen_len, wbits=wbits, abits=abits, kvbits=kvbits,
        compute_dtype=compute_dtype, matmul_dtype=mm, weight_dtype=wdt, weight_bandwidth_gbs=weight_bw / 1e9,
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


def measured_utilization(cfg: ModelConfig, hw: HardwareSpec, batch: int, prompt_len: int, gen_len: int,
                         tpot_s: float | None, ttft_s: float | None, wbits: int = 16, abits: int = 16,
                         kvbits: int = 16, compute_dtype: str = "fp16",
                         fused_attention: bool = True, weight_dtype: str | None = None
                         ) -> dict[str, float | None]:
    """MBU and MFU of a measured run: the modelled bytes (FLOPs) per measured second over the ceiling.

    MBU is against the peak ``mem_bandwidth_gbs``; ``decode_gemv_efficiency`` is the achieved bandwidth
    over the attainable GEMV bandwidth of the weight dtype (the peak when the spec has none).
    ``predicted_*_s`` use the attainable bandwidth, ``predicted_*_peak_s`` the peak.

    ``tpot_s`` should be the mean decode step time (it matches the model's mid-context step) and
    ``ttft_s`` the prefill time; either may be None, which makes its keys None.
    ``*_roofline_fraction`` = predicted / measured time (1.0 means running at the roofline);
    ``*_roofline_fraction_peak`` the same against the peak-bandwidth prediction.
    """
    report = analyze(cfg, hw, batch, prompt_len, gen_len, wbits, abits, kvbits, compute_dtype,
                     fused_attention, weight_dtype)
    peak, bw = hw.peak(report.matmul_dtype), hw.mem_bandwidth
    out: dict[str, float | None] = {
        "peak_flops": peak, "mem_bandwidth_gbs": hw.mem_bandwidth_gbs,
        "weight_bandwidth_gbs": report.weight_bandwidth_gbs,
        "predicted_tpot_s": report.tpot_s, "predicted_ttft_s": report.ttft_s,
        "predicted_tpot_peak_s": report.tpot_peak_s, "predicted_ttft_peak_s": report.ttft_peak_s,
    }
    for phase, measured, model in (("decode", tpot_s, report.decode), ("prefill", ttft_s, report.prefill)):
        if measured is not None and measured <= 0:
            raise FrugalError(f"measured_utilization: {phase} time must be positive, got {measured}")
        ok = measured is not None
        out[f"{phase}_achieved_gbs"] = model.bytes / measured / 1e9 if ok else None
        out[f"{phase}_achieved_flops"] = model.flops / measured if ok else None
        out[f"{phase}_mbu"] = model.bytes / measured / bw if ok else None
        out[f"{phase}_mfu"] = model.flops / measured / peak if ok else None
        out[f"{phase}_roofline_fraction"] = model.time_s / measured if ok else None
        peak_t = report.tpot_peak_s if phase == "decode" else report.ttft_peak_s
        out[f"{phase}_roofline_fraction_peak"] = peak_t / measured if ok else None
    out["decode_gemv_efficiency"] = (report.decode.bytes / tpot_s / (report.weight_bandwidth_gbs * 1e9)
                                     if tpot_s is not None else None)
    return out


# --------------------------------------------------------------------------------------- presentation


def _si(x: float, unit: str = "") -> str:
    if not math.isfinite(x):
        return "inf"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _seconds(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:.3g} us"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def format_table(report: RooflineReport, width: int = 110) -> str:
    """Render the per-op rows and the summary as plain text (rich tables, no colour codes)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Roofline: {report.model} on {report.hardware}  (batch {report.batch}, "
                        f"prompt {report.prompt_len}, gen {report.gen_len}, W{report.wbits}A{report.abits}"
                        f"KV{report.kvbits})")
    for col in ("phase", "op", "FLOPs", "bytes", "FLOP/B", "bound", "time", "share"):
        table.add_column(col, justify="left" if col in ("phase", "op", "bound") else "right")
    for ph in (report.prefill, report.decode):
        label = "prefill" if ph.phase == "prefill" else f"decode step (ctx {ph.context:g})"
        for r in ph.rows:
            share = r.time_s / ph.time_s if ph.time_s else 0.0
            table.add_row(label, r.name, _si(r.flops), _si(r.bytes, "B"),
                          "inf" if math.isinf(r.intensity) else f"{r.intensity:.3g}", r.bound,
                          _seconds(r.time_s), f"{share:.1%}")
            label = ""
        table.add_row("", "[b]total[/b]", _si(ph.flops), _si(ph.bytes, "B"), f"{ph.intensity:.3g}", "",
                      _seconds(ph.time_s), "", end_section=True)
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False)
    console.print(table)
    mem = f"weights {_si(report.weight_bytes, 'B')}, KV {_si(report.kv_cache_bytes, 'B')}, " \
          f"activations ~{_si(report.activation_peak_bytes, 'B')}"
    if report.fits_in_memory is not None:
        mem += "" if report.fits_in_memory else "  (DOES NOT FIT in device memory)"
    console.print(
        f"TTFT {_seconds(report.ttft_s)} | TPOT {_seconds(report.tpot_s)} | "
        f"decode {report.decode_tokens_per_s:.4g} tok/s (batch) | e2e {_seconds(report.e2e_latency_s)} | "
        f"matmul peak: {report.matmul_dtype}\nmemory: {mem}"
        + ("" if report.tpot_peak_s == report.tpot_s else
           f"\nweights stream at the attainable {report.weight_dtype} GEMV bandwidth "
           f"{report.weight_bandwidth_gbs:.4g} GB/s; at the peak bandwidth: TTFT {_seconds(report.ttft_peak_s)}"
           f" | TPOT {_seconds(report.tpot_peak_s)}")
    )
    return buf.getvalue()


def plot_roofline(report: RooflineReport, hw: HardwareSpec, path: str | Path,
                  measured_points: list[tuple[str, float, float]] | None = None) -> Path:
    """Write a log-log roofline PNG: one ceiling per dtype in ``hw``, each op at (intensity, FLOP/s
    at its predicted time), and optional measured ``(label, intensity, flops_per_s)`` points."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FrugalError("plotting needs matplotlib: pip install 'frugallm[lab]'") from None

    # Figure + Agg canvas, not pyplot: no global backend switch, safe in servers and threads.
    fig = Figure(figsize=(9, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [(r, ph.phase) for ph in (report.prefill, report.decode) for r in ph.rows
              if r.flops > 0 and r.bytes > 0 and r.time_s > 0]
    xs = [r.intensity for r, _ in points] + [p[1] for p in measured_points or []]
    lo = min([0.1, *xs]) / 2
    hi = max([max(hw.peak_flops.values()) / hw.mem_bandwidth * 10, *xs]) * 2
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for dtype, peak in sorted(hw.peak_flops.items(), key=lambda kv: -kv[1]):
        ax.plot(grid, [min(peak, x * hw.mem_bandwidth) for x in grid],
                label=f"{dtype} ceiling ({_si(peak)}FLOP/s)")
    markers = {"prefill": "o", "decode": "s"}
    for phase in ("prefill", "decode"):
        rows = [r for r, ph in points if ph == phase]
        ax.scatter([r.intensity for r in rows], [r.achieved_flops for r in rows], marker=markers[phase],
                   label=f"{phase} ops (predicted)", zorder=3)
        for r in rows:
            ax.annotate(r.name, (r.intensity, r.achieved_flops), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    for label, x, y in measured_points or []:
        ax.scatter([x], [y], marker="*", s=120, zorder=4)
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, -8), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(f"{report.model} on {hw.name} ({hw.mem_bandwidth_gbs:.4g} GB/s), batch {report.batch}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
