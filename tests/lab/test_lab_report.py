"""``frugallm report``: a standalone HTML page with embedded charts, and a Markdown table."""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from frugallm.cli import main
from frugallm.lab import bench, hwprobe, report, results, sweep


@pytest.fixture(scope="module")
def jsonl(tiny_models, tmp_path_factory) -> Path:
    """Real bench records of a tiny model (two configurations), variants of them, and an error record."""
    n = torch.get_num_threads()
    settings = bench.BenchSettings(probe=hwprobe.measure("cpu", quick=True), quality_windows=2,
                                   quality_window_len=32)
    model = str(tiny_models.hf("llama"))
    base = {k: getattr(sweep.BenchPoint, k) for k in sweep.POINT_FIELDS}
    pts = [{**base, "model": model, "dtype": dt, "batch": 2, "prompt_len": 16, "gen_len": 4, "repeat": 2,
            "threads": 1} for dt in ("float32", "bfloat16")]
    pts.append({**base, "model": model, "batch": 0})
    out = tmp_path_factory.mktemp("report") / "r.jsonl"
    recs = bench.run_points(pts, settings, out=out, progress=False)
    torch.set_num_threads(n)
    assert [r["status"] for r in recs] == ["ok", "ok", "error"]
    fake = copy.deepcopy(recs[0])  # a third configuration: smaller and worse
    fake["point"]["quant"], fake["label"] = "int4:group=32", "frugallm tiny float32 q=int4:group=32 b2 p16 g4"
    fake["metrics"]["weight_bytes"] //= 6
    fake["metrics"]["perplexity"] *= 1.1
    results.append_record(out, fake)
    return out


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[str] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.refs.append(v)
                if tag == "img":
                    self.imgs.append(v)


def test_html_is_standalone_with_embedded_charts(jsonl, tmp_path, capsys) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(jsonl), "-o", str(out)]) == 0
    text = out.read_text()
    parser = _Collect()
    parser.feed(text)
    parser.close()
    assert "script" not in parser.tags and "link" not in parser.tags
    assert not [r for r in parser.refs if not r.startswith("data:")]
    assert "http://" not in text and "https://" not in text
    assert len(parser.imgs) >= 4  # roofline, quality vs memory, quality vs throughput, latency
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    for needle in ("Quality vs memory", "Quality vs throughput", "Roofline on", "Latency distributions",
                   "estimated", "batch must be an integer", "q=int4:group=32", "<h3>Energy</h3>",
                   "not on a CUDA device"):
        assert needle in text, needle


def test_markdown_table(jsonl, capsys) -> None:
    assert main(["report", str(jsonl), "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 4 and all(line.startswith("|") and line.endswith("|") for line in lines)
    assert "ppl" in lines[0] and "J/tok" in lines[0]
    assert any(f"({m})" in lines[2] for m in ("estimated", "rapl", "nvml"))  # energy labelled with its method
    assert "error: batch must be" in lines[-2]


def test_report_of_missing_file_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "results file not found" in capsys.readouterr().err


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium to render the page headless")
def test_renders_in_headless_chromium(jsonl, tmp_path) -> None:
    page = report.write_html(results.read_records(jsonl), tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2000", page.resolve().as_uri()], check=True, timeout=60, capture_output=True)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_flags_notes_and_grouped_unavailable_rows(jsonl) -> None:
    recs = results.read_records(jsonl)
    ok = [r for r in recs if r["status"] == "ok"]
    busy = copy.deepcopy(ok[0])
    busy["label"] = "busy run"
    busy["notes"] = [*busy["notes"], "the machine was busy (1-min load average 7.9 on 2 logical cores)"]
    busy["flags"] = ["decode: MBU 393%: above a ceiling"]
    text = report.build_html([*recs, busy])
    head = text.split("<h2>Summary</h2>")[0]
    assert "Flags and machine notes" in head and "[busy run] decode: MBU 393%" in head
    assert "[busy run] the machine was busy (1-min load average 7.9" in head
    # One line for "not on a CUDA device" across every config and both CUDA metrics (was one row per pair).
    groups = report.unavailable_groups([*ok, busy])
    cuda = [g for g in groups if g[0] == "not on a CUDA device"]
    assert cuda == [("not on a CUDA device", ["cuda_max_allocated_bytes", "cuda_max_reserved_bytes"], "all 4")]
    assert text.count("not on a CUDA device") == 1


def test_quality_axis_spans_at_least_five_percent() -> None:
    lo, hi = report.quality_limits([10.00, 10.01, 10.02])  # a 0.2 % spread
    assert hi - lo >= 0.05 * 10.0 and lo < 10.0 and hi > 10.02
    lo, hi = report.quality_limits([10.0, 20.0])  # a real spread keeps its own scale
    assert lo < 10.0 and 20.0 < hi < 21.0
