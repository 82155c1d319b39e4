"""The roofline as people read it: a per-operation text table and a log-log PNG chart.

Kept apart from :mod:`frugallm.lab.roofline` (the counting model) so the model stays one screen of
arithmetic and needs neither rich nor matplotlib.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from frugallm.errors import FrugalError
from frugallm.lab.hardware import HardwareSpec
from frugallm.lab.roofline import RooflineReport


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


def _matmul_peaks(report: RooflineReport) -> str:
    if report.prefill_matmul_dtype == report.matmul_dtype:
        return report.matmul_dtype
    return f"prefill {report.prefill_matmul_dtype}, decode {report.matmul_dtype}"


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
        f"matmul peak: {_matmul_peaks(report)}\nmemory: {mem}"
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
    roof = max(hw.peak_flops.values())
    for i, (label, x, y) in enumerate(measured_points or [], 1):
        # Numbered stars named in the legend (labels of nearby points overlap); a star above every ceiling is
        # drawn with a red edge: the run's model (peak dtype, probe, bytes) is wrong, not the hardware beaten.
        above = y > min(roof, x * hw.mem_bandwidth) * 1.0001
        ax.scatter([x], [y], marker="*", s=140, zorder=4, edgecolors="red" if above else "none", linewidths=1.2,
                   label=f"{i}: {label}" + (" (ABOVE THE ROOF: see the record's flags)" if above else ""))
        ax.annotate(str(i), (x, y), fontsize=8, xytext=(5, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(f"{report.model} on {hw.name} ({hw.mem_bandwidth_gbs:.4g} GB/s), batch {report.batch}")
    ax.grid(True, which="both", alpha=0.3)
    if measured_points:  # many entries: below the axes, so the legend never hides points
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.1), frameon=False)
    else:
        ax.legend(fontsize=7, loc="lower right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out
