"""``frugallm report``: one self-contained HTML page (or a Markdown table) from bench records.

The page embeds every chart as a base64 PNG data URI and its CSS inline: no scripts, no network.
Charts: the roofline with measured points, quality-vs-memory and quality-vs-throughput Pareto charts,
latency distributions per configuration; then one table per metric group. Energy values carry their
method (``nvml`` / ``rapl`` / ``estimated``) wherever they are shown.

Honesty rules: the records' flags (figures past a ceiling, a doubtful probe, an already-quantized source) and
notes (a busy machine, how a figure was measured) are shown at the top, never dropped; a metric unavailable for
the same reason in many configurations is one line; chart points are numbered and named in a legend (labels
never overlap or get cut); a perplexity axis spans at least :data:`MIN_QUALITY_SPAN` of its lowest value, so
run-to-run noise does not look like a trend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from frugallm.errors import FrugalError
from frugallm.lab.results import config_label, record_warnings, summary_rows

MIN_QUALITY_SPAN = 0.05  # a perplexity axis covers at least 5 % of its lowest value

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.err{color:#a00}.note{color:#666;font-size:.85em}
"""

# (title, [(column, metric key or (key, stat), scale, format)])
_TABLES: list[tuple[str, list[tuple[str, Any, float, str]]]] = [
    ("Latency", [("TTFT p50 ms", ("ttft_s", "p50"), 1e3, ".4g"), ("TTFT p90 ms", ("ttft_s", "p90"), 1e3, ".4g"),
                 ("TTFT p99 ms", ("ttft_s", "p99"), 1e3, ".4g"), ("TPOT p50 ms", ("tpot_s", "p50"), 1e3, ".4g"),
                 ("TPOT p90 ms", ("tpot_s", "p90"), 1e3, ".4g"), ("TPOT p99 ms", ("tpot_s", "p99"), 1e3, ".4g"),
                 ("TPOT cv", ("tpot_s", "cv"), 1, ".2%"), ("e2e p50 s", ("e2e_s", "p50"), 1, ".4g"),
                 ("e2e p99 s", ("e2e_s", "p99"), 1, ".4g")]),
    ("Throughput", [("output tok/s", "output_tokens_per_s", 1, ".4g"), ("req/s", "requests_per_s", 1, ".4g"),
                    ("requests", "requests", 1, "d"), ("failed", "failed_requests", 1, "d")]),
    ("Memory", [("weights MB", "weight_bytes", 1e-6, ".4g"), ("KV MB", "kv_cache_bytes", 1e-6, ".4g"),
                ("KV B/token", "kv_cache_bytes_per_token", 1, ".4g"), ("peak RSS MB", "peak_rss_bytes", 1e-6, ".4g"),
                ("RSS sampled peak MB", "rss_sampled_peak_bytes", 1e-6, ".4g"),
                ("CUDA max alloc MB", "cuda_max_allocated_bytes", 1e-6, ".4g"),
                ("CUDA max reserved MB", "cuda_max_reserved_bytes", 1e-6, ".4g"), ("load s", "load_s", 1, ".3g")]),
    ("Compute and bandwidth utilization (roofline)", [
        ("decode MBU", "decode_mbu", 1, ".1%"), ("decode MFU", "decode_mfu", 1, ".2%"),
        ("prefill MBU", "prefill_mbu", 1, ".1%"), ("prefill MFU", "prefill_mfu", 1, ".1%"),
        ("decode GB/s", "decode_achieved_gbs", 1, ".4g"), ("prefill GFLOP/s", "prefill_achieved_flops", 1e-9, ".4g"),
        ("pred. TTFT ms", "predicted_ttft_s", 1e3, ".4g"), ("TTFT / pred.", "ttft_over_predicted", 1, ".3g"),
        ("pred. TPOT ms", "predicted_tpot_s", 1e3, ".4g"), ("TPOT / pred.", "tpot_over_predicted", 1, ".3g")]),
    ("Energy", [("method", "energy_method", 1, "s"), ("J / token", "energy_per_token_j", 1, ".4g"),
                ("J / request", "energy_per_request_j", 1, ".4g"), ("avg W", "avg_power_w", 1, ".4g")]),
    ("Compression", [("weights+KV / fp16", "compression_rate", 1, ".3g"),
                     ("fp16 baseline MB", "fp16_baseline_bytes", 1e-6, ".4g")]),
    ("Quality", [("perplexity", "perplexity", 1, ".5g"), ("NLL", "nll", 1, ".4g"),
                 ("KL vs fp32 (nats)", "kl_divergence", 1, ".3g"), ("top-1 agreement", "top1_agreement", 1, ".2%")]),
]


def _value(metrics: dict[str, Any], key: Any) -> Any:
    if isinstance(key, tuple):
        d = metrics.get(key[0])
        return d.get(key[1]) if isinstance(d, dict) else None
    return metrics.get(key)


def _cell(v: Any, scale: float, spec: str) -> str:
    if v is None:
        return "&ndash;"
    if spec == "s":
        return html.escape(str(v))
    if spec == "d":
        return str(int(v))
    return html.escape(format(v * scale, spec))


def _label(r: dict[str, Any]) -> str:
    return r.get("label") or config_label(r.get("point", {}))


# -------------------------------------------------------------------------------------------- charts


def _figure(w: float = 8.5, h: float = 5.0) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FrugalError("the report needs matplotlib: pip install 'frugallm[lab]'") from None
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _roofline_charts(ok: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One roofline per hardware spec: the first record's predicted ops plus every measured point."""
    from frugallm.config import ModelConfig
    from frugallm.lab.hardware import HardwareSpec
    from frugallm.lab.roofline import analyze
    from frugallm.lab.roofline_chart import plot_roofline

    by_hw: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        if r.get("roofline") and r.get("hardware") and r.get("model_config"):
            # The whole spec, not its name: two probes of one machine share a name, not their ceilings.
            by_hw.setdefault(json.dumps(r["hardware"], sort_keys=True), []).append(r)
    charts = []
    for recs in by_hw.values():
        first = recs[0]
        name = f"{first['hardware']['name']} ({first['hardware']['mem_bandwidth_gbs']:.3g} GB/s)"
        hw = HardwareSpec.from_dict(first["hardware"])
        cfg = ModelConfig.from_dict(first["model_config"])
        rf, pt = first["roofline"], first["point"]
        rep = analyze(cfg, hw, pt["batch"], pt["prompt_len"], pt["gen_len"], rf["wbits"], rf["abits"], rf["kvbits"],
                      rf["compute_dtype"], prefill_compute_dtype=rf.get("prefill_compute_dtype"))
        points = []
        for r in recs:
            m, rl = r["metrics"], r["roofline"]
            if m.get("decode_achieved_gbs"):
                points.append((f"{_label(r)} decode", rl["decode_intensity"],
                               m["decode_achieved_gbs"] * 1e9 * rl["decode_intensity"]))
            if m.get("prefill_achieved_flops"):
                points.append((f"{_label(r)} prefill", rl["prefill_intensity"], m["prefill_achieved_flops"]))
        with tempfile.TemporaryDirectory() as d:
            path = plot_roofline(rep, hw, Path(d) / "roofline.png", points)
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        charts.append((f"Roofline on {name} (ops predicted for {_label(first)}; stars: measured)", data))
    return charts


def _pareto(points: list[tuple[str, float, float]], lower_x_better: bool) -> list[tuple[float, float]]:
    """The non-dominated (x, y) points (y = perplexity, lower is better), sorted by x."""
    front = []
    for _, x, y in points:
        dominated = any((x2 <= x if lower_x_better else x2 >= x) and y2 <= y and (x2, y2) != (x, y)
                        for _, x2, y2 in points)
        if not dominated:
            front.append((x, y))
    return sorted(set(front))


def quality_limits(values: list[float], min_span: float = MIN_QUALITY_SPAN) -> tuple[float, float]:
    """y-axis limits for perplexities: the data with 8 % margins, widened to at least ``min_span`` of the
    lowest value (from just below it), so a 0.2 % spread does not fill the axis like a trend."""
    lo, hi = min(values), max(values)
    span = max(hi - lo, min_span * abs(lo)) or 1.0
    return lo - 0.08 * span, lo + 1.08 * span


def _wrap(label: str, width: int = 48) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width)) or label


def _scatter_chart(points: list[tuple[str, float, float]], xlabel: str, title: str, lower_x_better: bool,
                   logx: bool) -> str:
    fig = _figure(8.5, 5.0 + 0.22 * len(points))
    ax = fig.add_subplot()
    for i, (label, x, y) in enumerate(points, 1):
        # numbered points and the names in the legend: annotations of nearby points overlap
        ax.scatter([x], [y], s=40, zorder=3, label=f"{i}: {_wrap(label)}")
        ax.annotate(str(i), (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    front = _pareto(points, lower_x_better)
    if len(front) > 1:
        ax.plot([f[0] for f in front], [f[1] for f in front], "--", color="gray", label="Pareto front", zorder=2)
    if logx and all(p[1] > 0 for p in points):
        ax.set_xscale("log")
    ax.set_ylim(*quality_limits([p[2] for p in points]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"perplexity (lower is better; axis >= {MIN_QUALITY_SPAN:.0%} of the best)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.12), ncol=1, frameon=False)
    return _png(fig)


def _latency_chart(ok: list[dict[str, Any]]) -> str | None:
    series = [(r, r.get("samples") or {}) for r in ok]
    series = [(r, s) for r, s in series if s.get("ttft_s") or s.get("tpot_s")]
    if not series:
        return None
    fig = _figure(10, 1.5 + 0.45 * len(series) * 2)
    kinds = (("ttft_s", "time to first token (ms)"), ("tpot_s", "time per output token (ms)"))
    for i, (key, title) in enumerate(kinds):
        ax = fig.add_subplot(1, 2, i + 1)
        data = [[v * 1e3 for v in s.get(key) or []] or [math.nan] for _, s in series]
        ax.boxplot(data, showfliers=True, **_horizontal())
        ax.set_yticks(range(1, len(series) + 1))
        ax.set_yticklabels([_wrap(_label(r), 40) for r, _ in series] if i == 0 else [], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def _horizontal() -> dict[str, Any]:
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


# --------------------------------------------------------------------------------------------- pages


def _table(title: str, cols: list[tuple[str, Any, float, str]], ok: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c[0])}</th>" for c in cols)
    rows = []
    for r in ok:
        m = r["metrics"]
        cells = "".join(f"<td>{_cell(_value(m, key), scale, spec)}</td>" for _, key, scale, spec in cols)
        rows.append(f"<tr><td>{html.escape(_label(r))}</td>{cells}</tr>")
    return f"<h3>{html.escape(title)}</h3><table><tr><th>config</th>{head}</tr>{''.join(rows)}</table>"


def _img(title: str, data: str) -> str:
    return f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"><figcaption>' \
           f"{html.escape(title)}</figcaption></figure>"


def build_html(records: list[dict[str, Any]]) -> str:
    """The whole page as a string (see the module docstring)."""
    ok = [r for r in records if r.get("status") == "ok" and isinstance(r.get("metrics"), dict)]
    errors = [r for r in records if r.get("status") != "ok"]
    parts = [f"<h1>frugallm efficiency report</h1><p class=note>{len(ok)} measured point(s), {len(errors)} "
             f"error(s); generated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>"]
    methods = sorted({str(r["metrics"].get("energy_method")) for r in ok if r["metrics"].get("energy_method")})
    if "estimated" in methods:
        parts.append("<p class=note>Energy marked <b>estimated</b> is process CPU time x a per-core power figure, "
                     "not a measurement.</p>")
    warnings = record_warnings(ok)
    if warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
        parts.append(f"<h2>Flags and machine notes</h2><ul class=note>{items}</ul>")
    parts.append("<h2>Summary</h2>" + _rows_table(summary_rows(records)))
    parts.append("<h2>Charts</h2>")
    for title, data in _roofline_charts(ok):
        parts.append(_img(title, data))
    quality = [r for r in ok if r["metrics"].get("perplexity") is not None]
    mem = [(_label(r), (r["metrics"].get("weight_bytes") or 0) / 1e6 + (r["metrics"].get("kv_cache_bytes") or 0) / 1e6,
            r["metrics"]["perplexity"]) for r in quality if r["metrics"].get("weight_bytes")]
    if mem:
        parts.append(_img("Quality vs memory", _scatter_chart(mem, "weights + KV cache (MB, lower is better)",
                                                              "Quality vs memory", True, True)))
    thr = [(_label(r), r["metrics"]["output_tokens_per_s"], r["metrics"]["perplexity"]) for r in quality
           if r["metrics"].get("output_tokens_per_s")]
    if thr:
        parts.append(_img("Quality vs throughput", _scatter_chart(thr, "output tokens/s (higher is better)",
                                                                  "Quality vs throughput", False, True)))
    if not quality:
        parts.append("<p class=note>No record has a perplexity (run bench with --quality): no Pareto charts.</p>")
    lat = _latency_chart(ok)
    if lat:
        parts.append(_img("Latency distributions (all requests of all repetitions)", lat))
    parts.append("<h2>Metrics</h2>")
    for title, cols in _TABLES:
        parts.append(_table(title, cols, ok))
    unavailable = unavailable_groups(ok)
    if unavailable:
        rows = "".join(f"<tr><td>{html.escape(who)}</td><td>{html.escape(', '.join(keys))}</td>"
                       f"<td>{html.escape(why)}</td></tr>" for why, keys, who in unavailable)
        parts.append(f"<h3>Unavailable metrics</h3><table><tr><th>configs</th><th>metrics</th><th>why</th></tr>"
                     f"{rows}</table>")
    if errors:
        rows = "".join(f"<tr><td>{html.escape(_label(r))}</td><td class=err>{html.escape(str(r.get('error')))}"
                       "</td></tr>" for r in errors)
        parts.append(f"<h2>Errors</h2><table><tr><th>config</th><th>error</th></tr>{rows}</table>")
    parts.append(_environment(ok))
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>frugallm report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")


def unavailable_groups(ok: list[dict[str, Any]]) -> list[tuple[str, list[str], str]]:
    """``(why, metrics, configs)`` per reason: one line where a reason (e.g. "not on a CUDA device") holds for
    several metrics and configurations; ``configs`` is ``"all N"`` when it holds for every record."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for r in ok:
        for key, why in (r.get("unavailable") or {}).items():
            keys, labels = groups.setdefault(why, ([], []))
            if key not in keys:
                keys.append(key)
            if _label(r) not in labels:
                labels.append(_label(r))
    return [(why, keys, f"all {len(ok)}" if len(labels) == len(ok) and len(ok) > 1 else "; ".join(labels))
            for why, (keys, labels) in groups.items()]


def _rows_table(rows: list[dict[str, str]]) -> str:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(row.get(c, ''))}</td>" for c in cols) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _environment(ok: list[dict[str, Any]]) -> str:
    seen, rows = set(), []
    for r in ok:
        m, v = r.get("machine") or {}, r.get("versions") or {}
        hw = r.get("hardware") or {}
        row = (m.get("cpu_model"), m.get("gpu_name"), hw.get("name"), hw.get("mem_bandwidth_gbs"),
               ", ".join(f"{k} {x}" for k, x in v.items() if x), r.get("git_commit"))
        if row not in seen:
            seen.add(row)
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in row) + "</tr>")
    return ("<h2>Environment</h2><table><tr><th>CPU</th><th>GPU</th><th>roofline spec</th><th>GB/s</th>"
            f"<th>versions</th><th>git commit</th></tr>{''.join(rows)}</table>")


def write_html(records: list[dict[str, Any]], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_html(records), encoding="utf-8")
    return out


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The summary as a GitHub Markdown table (pipes in values escaped)."""
    rows = summary_rows(records)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("config", "status") else "---:"
                                                          for c in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(row.get(c, "").replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)
