"""Measured runs against the roofline: MBU, MFU and measured / predicted time.

:func:`measured_utilization` compares measured times with :func:`frugallm.lab.roofline.analyze`;
:func:`point_utilization` does it for one ``frugallm bench`` point, deriving the roofline's inputs from
what the backend really ran: bit widths from the measured weight and KV bytes, and for each phase the
dtype it multiplies in (:meth:`frugallm.lab.peers.base.Runner.compute_dtype`). A phase's MFU is only
meaningful against the peak of that dtype: frugallm's fp16 models on CPU prefill in bf16 (fp32 where
bf16 is emulated) but decode in fp16, and its quantized CPU matmuls run in bf16 or fp32.
"""

from __future__ import annotations

import math
from typing import Any

from frugallm.config import ModelConfig
from frugallm.errors import FrugalError
from frugallm.lab.hardware import HardwareSpec
from frugallm.lab.peers.base import Runner
from frugallm.lab.roofline import VALID_BITS, analyze

# torch dtype name (``Runner.dtype``) -> (activation bits, peak_flops entry). llama.cpp ("gguf") runs the
# file's own types; its activations are fp32.
DTYPE_BITS = {"float32": (32, "fp32"), "float16": (16, "fp16"), "bfloat16": (16, "bf16"), "gguf": (32, "fp32")}


def measured_utilization(cfg: ModelConfig, hw: HardwareSpec, batch: int, prompt_len: int, gen_len: int,
                         tpot_s: float | None, ttft_s: float | None, wbits: int = 16, abits: int = 16,
                         kvbits: int = 16, compute_dtype: str = "fp16",
                         fused_attention: bool = True, weight_dtype: str | None = None,
                         prefill_compute_dtype: str | None = None) -> dict[str, float | None]:
    """MBU and MFU of a measured run: the modelled bytes (FLOPs) per measured second over the ceiling.

    Each phase's MFU is against the peak of the dtype that phase multiplies in (``compute_dtype`` for
    decode, ``prefill_compute_dtype`` for prefill: see :func:`~frugallm.lab.roofline.analyze`); ``peak_flops``
    is decode's and ``prefill_peak_flops`` prefill's. MBU is against the peak ``mem_bandwidth_gbs``;
    ``decode_gemv_efficiency`` is the achieved bandwidth over the attainable GEMV bandwidth of the
    weight dtype (the peak when the spec has none).
    ``predicted_*_s`` use the attainable bandwidth, ``predicted_*_peak_s`` the peak.

    ``tpot_s`` should be the mean decode step time (it matches the model's mid-context step) and
    ``ttft_s`` the prefill time; either may be None, which makes its keys None.
    ``*_roofline_fraction`` = predicted / measured time (1.0 means running at the roofline);
    ``*_roofline_fraction_peak`` the same against the peak-bandwidth prediction.
    """
    report = analyze(cfg, hw, batch, prompt_len, gen_len, wbits, abits, kvbits, compute_dtype,
                     fused_attention, weight_dtype, prefill_compute_dtype)
    peaks = {"decode": hw.peak(report.matmul_dtype), "prefill": hw.peak(report.prefill_matmul_dtype)}
    bw = hw.mem_bandwidth
    out: dict[str, float | None] = {
        "peak_flops": peaks["decode"], "prefill_peak_flops": peaks["prefill"],
        "mem_bandwidth_gbs": hw.mem_bandwidth_gbs,
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
        out[f"{phase}_mfu"] = model.flops / measured / peaks[phase] if ok else None
        out[f"{phase}_roofline_fraction"] = model.time_s / measured if ok else None
        peak_t = report.tpot_peak_s if phase == "decode" else report.ttft_peak_s
        out[f"{phase}_roofline_fraction_peak"] = peak_t / measured if ok else None
    out["decode_gemv_efficiency"] = (report.decode.bytes / tpot_s / (report.weight_bandwidth_gbs * 1e9)
                                     if tpot_s is not None else None)
    return out


def _nearest_bits(effective: float) -> int:
    """The roofline bit width (``VALID_BITS``) closest to a measured bits-per-element, in log scale."""
    effective = max(effective, 1e-3)
    return min(VALID_BITS, key=lambda b: (abs(math.log2(b / effective)), b))


def peak_dtype(dtype: str, hw: HardwareSpec) -> str:
    """The ``hw.peak_flops`` entry that bounds matmuls in torch dtype ``dtype`` (``"float16"``, ...).

    A spec without that entry (a probe that skipped it) falls back to fp32, else its first entry: a
    rough MFU beats none, and the record's ``roofline`` says which peak was used.
    """
    peak = DTYPE_BITS.get(dtype, (32, "fp32"))[1]
    if peak not in hw.peak_flops:
        peak = "fp32" if "fp32" in hw.peak_flops else next(iter(hw.peak_flops))
    return peak


def point_utilization(cfg: ModelConfig, hw: HardwareSpec, runner: Runner, batch: int, prompt_len: int,
                      gen_len: int, weight_bytes: int, kv_bytes: int | None, ttft_s: float | None,
                      tpot_s: float | None) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Roofline metrics of one measured point: ``(metrics, roofline)``.

    ``metrics`` maps bench metric keys (``decode_mbu``, ``predicted_ttft_s``, ``tpot_over_predicted``,
    ...) to values, None where the needed time is None; ``roofline`` is the record's ``roofline`` table
    (the inputs used: bit widths, each phase's compute and matmul dtype and peak, intensities).
    ``ttft_s`` / ``tpot_s`` are the mean measured times. Raises :class:`FrugalError` when the spec
    cannot bound the run (e.g. no peak at all for a dtype).
    """
    abits, _ = DTYPE_BITS.get(runner.dtype, (32, "fp32"))
    # A static batch prefills batch x prompt_len tokens in one forward pass, then decodes batch at a time:
    # the engine picks each pass's dtype from its token count.
    prefill_compute = peak_dtype(runner.compute_dtype(batch * prompt_len), hw)
    decode_compute = peak_dtype(runner.compute_dtype(batch), hw)
    w_eff = weight_bytes * 8 / cfg.num_params
    kv_elems = 2 * cfg.num_layers * cfg.kv_size * batch * (prompt_len + gen_len - 1)
    kv_eff = kv_bytes * 8 / kv_elems if kv_bytes else (runner.kv_bits or abits)
    bits = {"wbits": _nearest_bits(w_eff), "abits": abits, "kvbits": _nearest_bits(kv_eff)}
    # The stored weight dtype picks the attainable GEMV bandwidth (fp16 weights stay fp16 even when the
    # CPU computes in fp32); quantized weights (wbits < 16) fall back to the peak bandwidth.
    stored = DTYPE_BITS.get(runner.dtype, (32, "fp32"))[1]
    weight_dtype = {32: "fp32", 16: stored if stored in ("bf16", "fp16") else "fp16"}.get(bits["wbits"])
    kw: dict[str, Any] = {"compute_dtype": decode_compute, "prefill_compute_dtype": prefill_compute,
                          "weight_dtype": weight_dtype, **bits}
    u = measured_utilization(cfg, hw, batch, prompt_len, gen_len, tpot_s, ttft_s, **kw)
    report = analyze(cfg, hw, batch, prompt_len, gen_len, **kw)
    metrics: dict[str, float | None] = {
        k: u[k] for k in ("decode_mbu", "decode_mfu", "decode_achieved_gbs", "decode_gemv_efficiency",
                          "prefill_mbu", "prefill_mfu", "prefill_achieved_flops", "predicted_ttft_s",
                          "predicted_tpot_s", "predicted_ttft_peak_s", "predicted_tpot_peak_s")}
    for name, measured in (("ttft", ttft_s), ("tpot", tpot_s)):
        for suffix in ("", "_peak"):
            predicted = u[f"predicted_{name}{suffix}_s"]
            metrics[f"{name}_over_predicted{suffix}"] = measured / predicted if measured and predicted else None
    flags = implausible(metrics, {"decode": report.matmul_dtype, "prefill": report.prefill_matmul_dtype})
    roofline = {"flags": flags, **bits, "wbits_effective": w_eff, "kvbits_effective": kv_eff,
                "compute_dtype": decode_compute,
                "matmul_dtype": report.matmul_dtype, "prefill_compute_dtype": prefill_compute,
                "prefill_matmul_dtype": report.prefill_matmul_dtype, "decode_intensity": report.decode.intensity,
                "prefill_intensity": report.prefill.intensity, "decode_flops": report.decode.flops,
                "decode_bytes": report.decode.bytes, "prefill_flops": report.prefill.flops,
                "prefill_bytes": report.prefill.bytes, "peak_flops": u["peak_flops"],
                "prefill_peak_flops": u["prefill_peak_flops"], "mem_bandwidth_gbs": u["mem_bandwidth_gbs"],
                "weight_dtype": report.weight_dtype, "weight_bandwidth_gbs": u["weight_bandwidth_gbs"]}
    return metrics, roofline


def implausible(metrics: dict[str, float | None], dtypes: dict[str, str]) -> list[str]:
    """One line per phase whose figures pass a ceiling: MFU or MBU above 100 %, or a measured time below
    the roofline's prediction. Such a figure means the model of the run is wrong (a peak of another dtype, a
    probe taken on a busy machine, bytes the run did not move), not that the run beat physics, so it is
    flagged in the record and the report rather than shown as a result. ``dtypes``: phase -> matmul dtype."""
    out = []
    for phase, time_key in (("decode", "tpot"), ("prefill", "ttft")):
        over = []
        for key, what in ((f"{phase}_mfu", f"MFU (vs the {dtypes[phase]} peak)"), (f"{phase}_mbu", "MBU")):
            v = metrics.get(key)
            if v is not None and v > 1.0:
                over.append(f"{what} {v:.0%}")
        if phase == "decode" and (v := metrics.get("decode_gemv_efficiency")) is not None and v > 1.0:
            over.append(f"GEMV efficiency {v:.0%}")
        for suffix, what in (("", "attainable-bandwidth"), ("_peak", "peak")):
            v = metrics.get(f"{time_key}_over_predicted{suffix}")
            if v is not None and v < 1.0:
                over.append(f"{time_key.upper()} {v:.2f}x the {what} roofline")
        if over:
            out.append(f"{phase}: {', '.join(over)}: above a ceiling, so the roofline's inputs do not describe "
                       "this run (check the peak's dtype and the probe's load)")
    return out
