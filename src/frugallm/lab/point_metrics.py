"""The metrics of one measured point beyond its timings, each filling :class:`~frugallm.lab.results.Metrics`
(a value, or ``None`` and the reason): latency summaries, MBU / MFU against the roofline, quality against the fp32
reference, what ``--spec`` did (and the same point without it), and the record's flags and notes about the source
model and the machine's load. :mod:`frugallm.lab.bench` runs the point and calls them.
"""

from __future__ import annotations

from typing import Any

import psutil

from frugallm.errors import FrugalError
from frugallm.lab import hwprobe
from frugallm.lab.hardware import HardwareSpec
from frugallm.lab.meters import summarize
from frugallm.lab.peers.base import Runner
from frugallm.lab.results import LATENCY_KEYS, Metrics
from frugallm.lab.sweep import BenchPoint
from frugallm.lab.utilization import point_utilization

_ROOFLINE_KEYS = ("decode_mbu", "decode_mfu", "prefill_mbu", "prefill_mfu", "decode_achieved_gbs",
                  "prefill_achieved_flops", "predicted_ttft_s", "predicted_tpot_s", "ttft_over_predicted",
                  "tpot_over_predicted", "predicted_ttft_peak_s", "predicted_tpot_peak_s", "ttft_over_predicted_peak",
                  "tpot_over_predicted_peak", "decode_gemv_efficiency")


def latency_metrics(m: Metrics, timings: list[Any], samples: dict[str, list[float]]) -> None:
    """Each latency key summarized over ``timings`` (the values kept in ``samples``)."""
    for key in LATENCY_KEYS:
        vals = [getattr(t, key) for t in timings if getattr(t, key) is not None]
        samples[key] = vals
        reason = "gen_len 1 has no time per output token" if key == "tpot_s" else "no successful request"
        m.put(key, summarize(vals), reason)


def utilization_metrics(m: Metrics, rec: dict[str, Any], p: BenchPoint, runner: Runner, hw: HardwareSpec,
                        kv_bytes: int | None) -> None:
    """MBU / MFU and measured over predicted times (``rec["roofline"]``: the prediction); a spec without the
    needed dtype peak leaves them ``None`` with the reason."""
    ttft, tpot = m.values.get("ttft_s"), m.values.get("tpot_s")
    try:
        values, rec["roofline"] = point_utilization(runner.config, hw, runner, p.batch, p.prompt_len, p.gen_len,
                                                    m.values["weight_bytes"], kv_bytes,
                                                    ttft["mean"] if ttft else None, tpot["mean"] if tpot else None)
    except FrugalError as e:
        m.none(_ROOFLINE_KEYS, f"roofline: {e}")
        return
    for key, value in values.items():
        no_decode = key.startswith("decode") or "tpot" in key
        m.put(key, value, "gen_len 1 has no decode step" if no_decode else "no TTFT")


def quality_metrics(m: Metrics, rec: dict[str, Any], p: BenchPoint, runner: Runner, corpus_text: str, windows: int,
                    window_len: int) -> None:
    """Perplexity, NLL, KL and top-1 agreement against the fp32 reference on ``windows`` corpus windows (a KV
    policy scored on the decode path)."""
    from frugallm.lab import quality

    keys = ("perplexity", "nll", "kl_divergence", "top1_agreement")
    if not p.quality:
        m.none(keys, "quality disabled (--no-quality)")
        return
    if not runner.can_score:
        m.none(keys, runner.score_reason)
        return
    is_ref = p.backend == "frugallm" and runner.dtype == "float32" and not p.quant and not p.kv
    model_key = f"{runner.path.resolve()}|{runner.device}"
    kw: dict[str, Any] = dict(model_key=model_key, is_reference=is_ref,
                              make_reference=quality.frugal_reference_scorer(p.model, runner.device, p.threads),
                              corpus_text=corpus_text, corpus_name=p.corpus, windows=windows, window_len=window_len)
    if p.kv:
        # A KV policy runs on the generation path only: score it there (prefill, then decode steps).
        llm = getattr(runner, "llm", None)
        if getattr(llm, "kv_spec", None) is None:
            m.none(keys, f"--kv quality needs frugallm's decode path; backend {p.backend} has none")
            return
        q = quality.evaluate_llm(llm, **kw)
    else:
        q = quality.evaluate(runner.score, runner.tokenizer, **kw)
    for k in keys:
        m.put(k, getattr(q, k), "no reference model")
    rec["quality"] = q.to_dict()


def spec_metrics(m: Metrics, rec: dict[str, Any], p: BenchPoint, runner: Runner, prompts: list[list[int]],
          tok_s: float, timings: list[Any]) -> list[str]:
    """``--spec``: what speculation did in the timed runs, then the same point without it (same loaded model,
    same prompts, its own warm-up and ``repeat`` runs) for the speedups. Returns the record's notes."""
    from frugallm.lab.results import SPEC_KEYS

    stats = runner.take_spec_stats()
    if stats is None:
        m.none(SPEC_KEYS, "no --spec")
        return []
    base, walls = [], []
    with runner.speculation_off():
        for _ in range(p.warmup):
            runner.generate(prompts, p.gen_len)
        for _ in range(p.repeat):
            res = runner.generate(prompts, p.gen_len)
            base += res.requests
            walls.append(res.wall_s)
    base_tok_s = sum(t.output_tokens for t in base) / sum(walls)
    base_tpot = [t.tpot_s for t in base if t.tpot_s is not None]
    spec_tpot = [t.tpot_s for t in timings if t.tpot_s is not None]
    no_decode = "gen_len 1 has no decode step"
    nothing = "no draft token was verified (every step decoded plainly)"
    drafted = stats.drafted > 0
    m.put("spec_acceptance_rate", stats.acceptance_rate if drafted else None, nothing)
    m.put("spec_mean_accepted_length", stats.mean_accepted_length if stats.rounds else None, nothing)
    m.put("spec_acceptance_by_position", [round(x, 4) for x in stats.acceptance_by_position] if drafted else None,
          nothing)
    m.put("spec_draft_share", stats.draft_share)
    m.put("spec_memory_bytes", stats.memory_bytes)
    m.put("nospec_output_tokens_per_s", base_tok_s)
    m.put("nospec_tpot_s", summarize(base_tpot) if base_tpot else None, no_decode)
    m.put("spec_speedup", tok_s / base_tok_s)
    ratio = sum(base_tpot) / len(base_tpot) / (sum(spec_tpot) / len(spec_tpot)) if base_tpot and spec_tpot else None
    m.put("spec_decode_speedup", ratio, no_decode)
    rec["spec"] = {"config": p.spec, **stats.as_dict(), "proposed_at": stats.proposed_at,
                   "accepted_at": stats.accepted_at, "draft_s": stats.draft_s, "verify_s": stats.verify_s,
                   "plain_s": stats.plain_s}
    return ["--spec: nospec_* metrics and the speedups come from the same loaded model decoding the same prompts "
            "without speculation, right after the timed runs; the other metrics are the speculative runs'",
            "--spec: a verify pass emits several tokens per read of the weights, so TPOT below the one-token "
            "roofline (MBU > 100 %) is expected, not a measuring error"]


def source_quant_flags(p: BenchPoint, runner: Runner) -> list[str]:
    """A model file that is already quantized makes ``--quant`` look nearly lossless: say so."""
    src = runner.source_quantization
    if src is None:
        return []
    if p.quant:
        return [f"the source model is already quantized ({src}): --quant {p.quant} re-quantizes quantized "
                "weights, and quality is measured against this file dequantized to fp32, not against the original "
                "model, so the loss reads smaller than quantizing the original would give"]
    return [f"the source model is already quantized ({src}): the fp32 reference for quality is this file "
            "dequantized, not the original model"]


def load_note(load: float | None) -> list[str]:
    """A note when the machine was busy while the point ran (its timings include contention)."""
    if hwprobe.is_busy(load):
        return [f"the machine was busy (1-min load average {load:.1f} on {psutil.cpu_count(logical=True) or 1} "
                "logical cores): timings include contention from other processes"]
    return []
