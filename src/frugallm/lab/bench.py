"""``frugallm bench``: measure one configuration or a sweep, next to the roofline prediction.

For each point (:class:`~frugallm.lab.sweep.BenchPoint`: model x backend x engine options x batch x
prompt/generation length): load once, warm up, then ``repeat`` timed static batches of synthetic prompts
of exactly ``prompt_len`` corpus tokens. The record holds every metric of
:data:`~frugallm.lab.results.METRIC_KEYS`; a metric that cannot be measured here is ``null`` and
``unavailable[key]`` says why. Records append to a JSONL file (see :mod:`frugallm.lab.results`), so a
sweep resumes where it stopped.

The pieces live next door: sweep files and points in :mod:`~frugallm.lab.sweep`, memory and energy
meters in :mod:`~frugallm.lab.meters`, the metrics beyond timings (latency summaries, MBU/MFU, quality, --spec)
in :mod:`~frugallm.lab.point_metrics`, backends in :mod:`~frugallm.lab.peers`, the summary table in
:mod:`~frugallm.lab.results`. Caveats of the meters
(peak RSS, energy method) are recorded in each record's ``notes``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from frugallm.errors import FrugalError
from frugallm.lab import hwprobe, results
from frugallm.lab.hardware import HardwareSpec
from frugallm.lab.meters import DEFAULT_WATTS_PER_CORE, RssSampler, make_energy_meter, peak_rss_bytes
from frugallm.lab.peers import BACKENDS, make_runner
from frugallm.lab.peers.base import Runner, load_model_config, load_tokenizer
from frugallm.lab.point_metrics import (
    latency_metrics,
    load_note,
    quality_metrics,
    source_quant_flags,
    spec_metrics,
    utilization_metrics,
)
from frugallm.lab.quality import corpus_ids
from frugallm.lab.results import METRIC_KEYS, Metrics
from frugallm.lab.sweep import BenchPoint

NOTES = (
    "peak_rss_bytes is the process high-water mark (not resettable in-process); peak_rss_delta_bytes is its "
    "growth during this point; rss_sampled_peak_bytes is sampled every 20 ms during the timed runs",
    "fp16 baseline = num_params x 2 bytes + fp16 K/V of batch x (prompt_len + gen_len - 1) tokens",
)


def synthetic_prompts(tokenizer: Any, corpus_text: str, batch: int, prompt_len: int) -> list[list[int]]:
    """``batch`` different prompts of exactly ``prompt_len`` corpus tokens (consecutive windows; the
    corpus wraps around when it is shorter than ``batch x prompt_len`` tokens)."""
    need = batch * prompt_len
    try:
        ids = corpus_ids(tokenizer, corpus_text, need)
    except FrugalError:  # a short --corpus: repeat it
        ids = tokenizer.encode(corpus_text, add_special_tokens=False)
        if not ids:
            raise FrugalError("the corpus is empty after tokenization") from None
        ids = (ids * (need // len(ids) + 1))[:need]
    return [ids[i * prompt_len:(i + 1) * prompt_len] for i in range(batch)]


def local_probe(device: str) -> hwprobe.ProbeResult:
    """The cached full probe of ``device``; measured (~20 s) and cached on first use. Not the quick
    probe: its small buffers and 2 runs make MBU/MFU meaningless."""
    return hwprobe.probe_result("cuda" if device.startswith("cuda") else "cpu")


# ------------------------------------------------------------------------------------------ settings


@dataclass
class BenchSettings:
    """Options that are not part of a point's identity."""

    hw: HardwareSpec | None = None  # None: this machine's probe
    probe: hwprobe.ProbeResult | None = None  # used instead of probing (tests)
    watts_per_core: float = DEFAULT_WATTS_PER_CORE
    quality_windows: int = 4
    quality_window_len: int = 256
    use_cache: bool = True
    served_model: str | None = None
    corpus_texts: dict[str, str] = field(default_factory=dict)

    def corpus(self, name: str) -> str:
        if name not in self.corpus_texts:
            from frugallm.corpus import load_corpus

            self.corpus_texts[name] = load_corpus(None if name == "builtin" else name)
        return self.corpus_texts[name]


class RunnerCache:
    """Keeps the last loaded backend so consecutive points of one configuration load it once."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.runner: Runner | None = None
        self.reused = False

    @staticmethod
    def _key(p: BenchPoint) -> tuple[Any, ...]:
        return (p.backend, p.model, p.dtype, p.quant, p.kv, p.spec, p.device, p.threads)

    def holds(self, p: BenchPoint) -> bool:
        return self.runner is not None and self.key == self._key(p)

    def get(self, p: BenchPoint, settings: BenchSettings, n_ctx: int) -> Runner:
        key = self._key(p)
        if self.holds(p):
            self.reused = True
            return self.runner
        self.close()
        self.reused = False
        self.runner = make_runner(p.backend, p.model, dtype=p.dtype, device=p.device, threads=p.threads,
                                  quant=p.quant, kv=p.kv, use_cache=settings.use_cache, n_ctx=n_ctx,
                                  spec=p.spec)
        self.key = key
        return self.runner

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner, self.key = None, None
        gc.collect()


# ----------------------------------------------------------------------------------------- one point


def _check_context(p: BenchPoint, cfg: Any) -> Any:
    limit = cfg.max_position_embeddings
    if p.prompt_len + p.gen_len > limit:
        raise FrugalError(f"prompt_len {p.prompt_len} + gen_len {p.gen_len} = {p.prompt_len + p.gen_len} tokens "
                          f"exceeds the context window of {p.model} ({limit} tokens)")
    return cfg


def _run_local(p: BenchPoint, settings: BenchSettings, cache: RunnerCache) -> dict[str, Any]:
    why = BACKENDS[p.backend].missing()
    if why:  # before any model work: a missing optional peer is reported at once
        raise FrugalError(why)
    n_ctx = p.prompt_len + p.gen_len + 8
    if p.backend == "frugallm" or cache.holds(p):
        # Loading frugallm from its weights cache is faster than parsing a GGUF's metadata.
        cfg = _check_context(p, cache.get(p, settings, n_ctx).config)
    else:  # peers load slowly: reject an invalid point from the config alone
        cfg = _check_context(p, load_model_config(p.model))
    runner = cache.get(p, settings, n_ctx)
    rec = results.ok_record(p.params())
    m = Metrics()
    prompts = synthetic_prompts(runner.tokenizer, settings.corpus(p.corpus), p.batch, p.prompt_len)
    for _ in range(p.warmup):
        runner.generate(prompts, p.gen_len)
    cuda = runner.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    meter = make_energy_meter(runner.device, settings.watts_per_core)
    gc.collect()
    load_before = hwprobe.loadavg_1m()
    rss_hwm_before = peak_rss_bytes()
    timings, walls, kv_bytes = [], [], None
    runner.take_spec_stats()  # --spec: count the timed runs only
    with RssSampler() as rss:
        e0 = meter.read()
        for _ in range(p.repeat):
            res = runner.generate(prompts, p.gen_len)
            timings += res.requests
            walls.append(res.wall_s)
            kv_bytes = res.kv_cache_bytes
        energy = meter.read() - e0
    samples: dict[str, list[float]] = {}
    latency_metrics(m, timings, samples)
    wall = sum(walls)
    n_out = sum(t.output_tokens for t in timings)
    m.put("output_tokens", n_out)
    m.put("requests", len(timings))
    m.put("failed_requests", 0)
    m.put("output_tokens_per_s", n_out / wall)
    m.put("requests_per_s", len(timings) / wall)
    m.put("load_s", runner.load_s)
    m.put("peak_rss_bytes", peak_rss_bytes())
    m.put("peak_rss_delta_bytes", peak_rss_bytes() - rss_hwm_before)
    m.put("rss_sampled_peak_bytes", rss.peak)
    no_cuda = "not on a CUDA device"
    m.put("cuda_max_allocated_bytes", torch.cuda.max_memory_allocated() if cuda else None, no_cuda)
    m.put("cuda_max_reserved_bytes", torch.cuda.max_memory_reserved() if cuda else None, no_cuda)
    m.put("weight_bytes", runner.weight_bytes())
    m.put("kv_cache_bytes", kv_bytes, runner.kv_reason)
    tokens = p.batch * (p.prompt_len + p.gen_len - 1)
    m.put("kv_cache_bytes_per_token", kv_bytes / tokens if kv_bytes else None, runner.kv_reason)
    fp16_kv = 2 * cfg.num_layers * cfg.kv_size * 2 * tokens
    baseline = cfg.num_params * 2 + fp16_kv
    m.put("fp16_baseline_bytes", baseline)
    m.put("compression_rate", (m.values["weight_bytes"] + kv_bytes) / baseline if kv_bytes else None,
          runner.kv_reason)
    m.put("energy_method", meter.method)
    m.put("energy_j", energy)
    m.put("energy_per_token_j", energy / n_out)
    m.put("energy_per_request_j", energy / len(timings))
    m.put("avg_power_w", energy / wall)
    spec_notes = spec_metrics(m, rec, p, runner, prompts, n_out / wall, timings)
    src_quant = source_quant_flags(p, runner)
    probe = settings.probe if settings.probe is not None else local_probe(runner.device)
    hw = settings.hw or probe.spec
    utilization_metrics(m, rec, p, runner, hw, kv_bytes)
    quality_metrics(m, rec, p, runner, settings.corpus(p.corpus), settings.quality_windows,
                    settings.quality_window_len)
    rec["metrics"], rec["unavailable"] = m.finish()
    rec.update(energy_method=meter.method, samples=samples, hardware=hw.to_dict(),
               machine=results.machine_info(probe), model_config=cfg.to_dict(),
               engine={"backend": runner.backend, "dtype": runner.dtype, "device": runner.device,
                       "threads": torch.get_num_threads(), "quant": p.quant, "kv": p.kv, "model_path": str(runner.path),
                       "reused_loaded_model": cache.reused, "source_quantization": runner.source_quantization},
               system_load={"loadavg_1m_before": load_before, "loadavg_1m_after": hwprobe.loadavg_1m(),
                            "logical_cores": psutil.cpu_count(logical=True)},
               notes=[*NOTES, meter.note, *runner.notes, *load_note(load_before), *spec_notes],
               # figures past a ceiling, and what makes the probe they are measured against doubtful
               flags=[*src_quant, *rec.get("roofline", {}).get("flags", []),
                      *(probe.notes() if settings.hw is None else [])])
    return rec



def _run_endpoint(p: BenchPoint, settings: BenchSettings) -> dict[str, Any]:
    from frugallm.lab.endpoint import run_load
    from frugallm.loading import resolve_model_path

    tok = load_tokenizer(resolve_model_path(p.model))
    ids = synthetic_prompts(tok, settings.corpus(p.corpus), max(p.batch, p.concurrency), p.prompt_len)
    prompts = [tok.decode(x, skip_special_tokens=False) for x in ids]
    n = p.requests or p.batch * p.repeat
    if p.warmup:
        run_load(p.endpoint, prompts, max_tokens=p.gen_len, concurrency=1, requests=p.warmup,
                 model=settings.served_model)
    reqs, wall = run_load(p.endpoint, prompts, max_tokens=p.gen_len, concurrency=p.concurrency, requests=n,
                          model=settings.served_model)
    ok = [r for r in reqs if r.ok]
    errors = [r.error for r in reqs if not r.ok]
    if not ok:
        raise FrugalError(f"all {n} requests to {p.endpoint} failed: {errors[0]}")
    rec = results.ok_record(p.params())
    m = Metrics()
    samples: dict[str, list[float]] = {}
    latency_metrics(m, ok, samples)
    n_out = sum(r.output_tokens for r in ok)
    m.put("output_tokens", n_out)
    m.put("requests", len(ok))
    m.put("failed_requests", len(errors))
    m.put("output_tokens_per_s", n_out / wall)
    m.put("requests_per_s", len(ok) / wall)
    m.none(METRIC_KEYS, "remote endpoint: not observable from the load generator")
    rec["metrics"], rec["unavailable"] = m.finish()
    rec.update(samples=samples, errors=errors[:10], energy_method=None,
               notes=["endpoint: prompts are corpus windows of prompt_len tokens of --model's tokenizer, sent "
                      "as text (the server re-tokenizes); TTFT/TPOT from SSE chunk arrival times"])
    return rec


def run_point(params: dict[str, Any], settings: BenchSettings | None = None,
              cache: RunnerCache | None = None) -> dict[str, Any]:
    """Measure one point; any user-facing problem becomes an error record (never an exception)."""
    settings = settings or BenchSettings()
    own_cache = cache is None
    cache = cache or RunnerCache()
    try:
        p = BenchPoint(**params)
        return _run_endpoint(p, settings) if p.backend == "endpoint" else _run_local(p, settings, cache)
    except FrugalError as e:
        return results.error_record(params, str(e))
    except TypeError as e:  # unknown point field
        return results.error_record(params, f"invalid point: {e}")
    except RuntimeError as e:  # out of memory, a backend failure: record it, run the next point
        return results.error_record(params, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        if own_cache:
            cache.close()


def run_points(points: list[dict[str, Any]], settings: BenchSettings | None = None, out: str | Path | None = None,
               resume: bool = True, progress: bool = True,
               on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run points in order, appending each record to ``out``; with ``resume`` skip keys already there."""
    settings = settings or BenchSettings()
    done = results.done_keys(out) if out is not None and resume else set()
    todo = [pt for pt in points if results.point_key(pt) not in done]
    records: list[dict[str, Any]] = []
    cache = RunnerCache()
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=Console(stderr=True), transient=True)
        bar.start()
        task = bar.add_task("bench", total=len(todo))
    try:
        for pt in todo:
            if bar is not None:
                bar.update(task, description=results.config_label(pt))
            rec = run_point(pt, settings, cache)
            if out is not None:
                results.append_record(out, rec)
            records.append(rec)
            if on_record is not None:
                on_record(rec)
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
        cache.close()
    return records
