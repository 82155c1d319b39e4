"""``frugallm bench``: measure one configuration or a sweep, next to the roofline prediction.

For each point (model x backend x engine options x batch x prompt/generation length): load once,
warm up, then ``repeat`` timed static batches of synthetic prompts of exactly ``prompt_len`` corpus
tokens. The record holds every metric of :data:`METRIC_KEYS`; a metric that cannot be measured here is
``null`` and ``unavailable[key]`` says why. Records append to a JSONL file (see
:mod:`frugallm.lab.results`), so a sweep resumes where it stopped.

Caveats recorded in each record's ``notes``:

* peak RSS: the process high-water mark cannot be reset in-process, so ``peak_rss_bytes`` is the peak
  so far, ``peak_rss_delta_bytes`` its growth during this point (0 if an earlier point set it), and
  ``rss_sampled_peak_bytes`` the largest RSS sampled every 20 ms during the timed runs of this point;
* energy: NVML on CUDA, else Linux RAPL package counters (whole package, other processes included),
  else ``estimated`` = process CPU seconds x ``watts_per_core``; ``energy_method`` says which.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil
import torch

from frugallm.errors import FrugalError
from frugallm.lab import results
from frugallm.lab.hwspecs import HardwareSpec
from frugallm.lab.peers import BACKENDS, Runner, load_model_config, load_tokenizer, make_runner
from frugallm.lab.quality import corpus_ids

ALL_BACKENDS = (*BACKENDS, "endpoint")
LATENCY_KEYS = ("ttft_s", "tpot_s", "e2e_s")
METRIC_KEYS = (
    *LATENCY_KEYS, "output_tokens", "requests", "failed_requests", "output_tokens_per_s", "requests_per_s",
    "load_s", "peak_rss_bytes", "peak_rss_delta_bytes", "rss_sampled_peak_bytes", "cuda_max_allocated_bytes",
    "cuda_max_reserved_bytes", "weight_bytes", "kv_cache_bytes", "kv_cache_bytes_per_token",
    "fp16_baseline_bytes", "compression_rate", "decode_mbu", "decode_mfu", "prefill_mbu", "prefill_mfu",
    "decode_achieved_gbs", "prefill_achieved_flops", "predicted_ttft_s", "predicted_tpot_s",
    "ttft_over_predicted", "tpot_over_predicted", "predicted_ttft_peak_s", "predicted_tpot_peak_s",
    "ttft_over_predicted_peak", "tpot_over_predicted_peak", "decode_gemv_efficiency",
    "energy_method", "energy_j", "energy_per_token_j",
    "energy_per_request_j", "avg_power_w", "perplexity", "nll", "kl_divergence", "top1_agreement",
)
DEFAULT_WATTS_PER_CORE = 10.0
RSS_SAMPLE_S = 0.02
NOTES = (
    "peak_rss_bytes is the process high-water mark (not resettable in-process); peak_rss_delta_bytes is its "
    "growth during this point; rss_sampled_peak_bytes is sampled every 20 ms during the timed runs",
    "fp16 baseline = num_params x 2 bytes + fp16 K/V of batch x (prompt_len + gen_len - 1) tokens",
)


# ------------------------------------------------------------------------------------------ points


@dataclass(frozen=True)
class BenchPoint:
    """One configuration to measure; validated at construction (FrugalError names the problem)."""

    model: str = "default"
    backend: str = "frugallm"
    dtype: str = "auto"
    quant: str | None = None
    kv: str | None = None
    device: str = "auto"
    threads: int | None = None
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 32
    repeat: int = 3
    warmup: int = 1
    quality: bool = True
    corpus: str = "builtin"
    endpoint: str | None = None
    concurrency: int = 1
    requests: int | None = None  # endpoint only; default batch x repeat

    def __post_init__(self) -> None:
        if self.backend not in ALL_BACKENDS:
            raise FrugalError(f"unknown backend {self.backend!r}; valid: {', '.join(ALL_BACKENDS)}")
        for name, low in (("batch", 1), ("prompt_len", 1), ("gen_len", 1), ("repeat", 1), ("warmup", 0),
                          ("concurrency", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise FrugalError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.requests is not None and self.requests < 1:
            raise FrugalError(f"requests must be >= 1, got {self.requests}")
        if (self.backend == "endpoint") != bool(self.endpoint):
            raise FrugalError("the endpoint backend needs an endpoint URL (and an endpoint URL needs it)")

    def params(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        return results.point_key(self.params())

    @property
    def label(self) -> str:
        return results.config_label(self.params())


POINT_FIELDS = tuple(f.name for f in fields(BenchPoint))


# ------------------------------------------------------------------------------------------- sweeps

_SWEEP_AXES = {"models": "model", "backends": "backend", "batches": "batch", "batch_sizes": "batch",
               "prompt_lens": "prompt_len", "gen_lens": "gen_len", "dtypes": "dtype", "quants": "quant",
               "kvs": "kv"}
_ENGINE_KEYS = ("dtype", "quant", "kv", "device", "threads")


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``) or TOML (``.toml``) sweep file into a dict."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise FrugalError(f"cannot read sweep file {p}: {e}") from None
    try:
        if p.suffix.lower() == ".toml":
            from frugallm.lab.hwspecs import tomllib

            if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
                raise FrugalError("reading TOML on Python 3.10 needs the 'tomli' package")
            data = tomllib.loads(raw.decode("utf-8"))
        elif p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise FrugalError("YAML sweep files need pyyaml: pip install 'frugallm[lab]'") from None
            data = yaml.safe_load(raw.decode("utf-8"))
        else:
            raise FrugalError(f"sweep file {p} must end in .yaml, .yml or .toml")
    except FrugalError:
        raise
    except Exception as e:  # noqa: BLE001 - yaml/toml parse errors have no common base class
        raise FrugalError(f"cannot parse sweep file {p}: {str(e).splitlines()[0] if str(e) else e}") from None
    if not isinstance(data, dict):
        raise FrugalError(f"sweep file {p} must be a mapping of options, got {type(data).__name__}")
    return data


def expand_sweep(spec: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The cartesian product models x backends x engine options x batch x prompt_len x gen_len.

    Each axis is a scalar or a list, under its singular or plural name (``model``/``models``,
    ``batch``/``batches``, ...). ``engine`` is a list of tables of ``dtype``/``quant``/``kv``/``device``/
    ``threads``; without it, the ``dtype`` x ``quant`` x ``kv`` lists are crossed. Other keys (repeat,
    warmup, quality, corpus, endpoint, concurrency, requests) apply to every point. Points are returned
    as parameter dicts, not validated: an invalid one becomes an error record when run.
    """
    spec = {_SWEEP_AXES.get(k, k): v for k, v in spec.items()}
    valid = set(POINT_FIELDS) | {"engine"}
    unknown = sorted(set(spec) - valid)
    if unknown:
        raise FrugalError(f"sweep file: unknown key(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(valid | set(_SWEEP_AXES)))}")

    def axis(name: str, default: Any) -> list[Any]:
        v = spec.get(name, default)
        return list(v) if isinstance(v, (list, tuple)) else [v]

    base = {**(defaults or {}), **{k: v for k, v in spec.items()
                                   if k not in ("engine", "model", "backend", "batch", "prompt_len",
                                                "gen_len", *_ENGINE_KEYS)}}
    if "engine" in spec:
        engines = spec["engine"] if isinstance(spec["engine"], list) else [spec["engine"]]
        for e in engines:
            if not isinstance(e, dict) or set(e) - set(_ENGINE_KEYS):
                raise FrugalError(f"sweep file: each engine entry must be a table with keys among "
                                  f"{', '.join(_ENGINE_KEYS)}; got {e!r}")
    else:
        engines = [{"dtype": d, "quant": q, "kv": k}
                   for d, q, k in itertools.product(axis("dtype", (defaults or {}).get("dtype", "auto")),
                                                    axis("quant", None), axis("kv", None))]
    d = defaults or {}
    # Top-level (or command-line) device / threads apply to every engine entry that does not set them.
    engines = [{**{k: spec.get(k, d.get(k)) for k in ("device", "threads") if spec.get(k, d.get(k)) is not None},
                **e} for e in engines]
    out = []
    for model, backend, engine, batch, plen, glen in itertools.product(
            axis("model", d.get("model", "default")), axis("backend", d.get("backend", "frugallm")), engines,
            axis("batch", d.get("batch", 1)), axis("prompt_len", d.get("prompt_len", 128)),
            axis("gen_len", d.get("gen_len", 32))):
        params = {**base, "model": str(model), "backend": backend, **engine, "batch": batch, "prompt_len": plen,
                  "gen_len": glen}
        out.append({k: params.get(k, getattr(BenchPoint, k)) for k in POINT_FIELDS})
    return out


# ------------------------------------------------------------------------------------------ measuring


def summarize(values: Iterable[float]) -> dict[str, float] | None:
    """n, mean, std, cv, min, p50, p90, p99, max (linear-interpolated percentiles); None when empty."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None

    def pct(q: float) -> float:
        pos = (len(xs) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    mean = statistics.fmean(xs)
    std = statistics.pstdev(xs) if len(xs) > 1 else 0.0
    return {"n": len(xs), "mean": mean, "std": std, "cv": std / mean if mean else 0.0, "min": xs[0],
            "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": xs[-1]}


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


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssSampler:
    """Largest RSS seen by a background thread while active (``with RssSampler() as s: ...; s.peak``)."""

    def __init__(self, interval_s: float = RSS_SAMPLE_S) -> None:
        self.interval_s, self.peak = interval_s, 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


class EnergyMeter:
    """Cumulative energy in joules from one source; ``method`` labels it everywhere it is shown."""

    method = ""
    note = ""

    def read(self) -> float:
        raise NotImplementedError


class NvmlMeter(EnergyMeter):
    method, note = "nvml", "NVML total energy of the GPU (the GPU board only, not the host)"

    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.read()  # raises on GPUs without the energy counter (pre-Volta)

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3  # mJ -> J


class RaplMeter(EnergyMeter):
    method, note = "rapl", "Linux powercap RAPL package counters: the whole CPU package, other processes included"

    def __init__(self, root: Path = Path("/sys/class/powercap")) -> None:
        # Top-level zones only (intel-rapl:N): sub-zones (intel-rapl:N:M) are already inside them.
        self._zones = [z for z in sorted(root.glob("intel-rapl:*")) if z.name.count(":") == 1]
        if not self._zones:
            raise OSError("no RAPL zones")
        self._max = [int((z / "max_energy_range_uj").read_text()) for z in self._zones]
        self._last = self._raw()  # raises PermissionError when not readable (the usual case)
        self._total = 0.0

    def _raw(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self._zones]

    def read(self) -> float:
        now = self._raw()
        for i, (a, b) in enumerate(zip(self._last, now, strict=True)):
            self._total += (b - a if b >= a else b + self._max[i] - a) / 1e6  # the counter wraps
        self._last = now
        return self._total


class EstimatedMeter(EnergyMeter):
    method = "estimated"

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> None:
        self.watts_per_core = watts_per_core
        self.note = f"estimated: process CPU seconds x {watts_per_core:g} W per busy core (not measured)"
        self._proc = psutil.Process()

    def read(self) -> float:
        t = self._proc.cpu_times()
        return (t.user + t.system) * self.watts_per_core


def make_energy_meter(device: str, watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> EnergyMeter:
    """NVML for a CUDA device (pynvml importable), else readable RAPL, else the CPU-time estimate."""
    if device.startswith("cuda"):
        try:
            return NvmlMeter(torch.device(device).index or 0)
        except Exception:  # noqa: BLE001 - pynvml missing, no driver, no energy counter: fall back
            pass
    try:
        return RaplMeter()
    except (OSError, ValueError):
        return EstimatedMeter(watts_per_core)


def _nearest_bits(effective: float) -> int:
    """The roofline bit width (``VALID_BITS``) closest to a measured bits-per-element, in log scale."""
    from frugallm.lab.roofline import VALID_BITS

    effective = max(effective, 1e-3)
    return min(VALID_BITS, key=lambda b: (abs(math.log2(b / effective)), b))


_DTYPE_BITS = {"float32": (32, "fp32"), "float16": (16, "fp16"), "bfloat16": (16, "bf16"), "gguf": (32, "fp32")}


def local_probe(device: str) -> Any:
    """The cached full probe of ``device``; measured (~20 s) and cached on first use. Not the quick
    probe: its small buffers and 2 runs make MBU/MFU meaningless."""
    from frugallm.lab import hwprobe

    return hwprobe.probe_result("cuda" if device.startswith("cuda") else "cpu")


# ------------------------------------------------------------------------------------------ settings


@dataclass
class BenchSettings:
    """Options that are not part of a point's identity."""

    hw: HardwareSpec | None = None  # None: this machine's probe
    probe: Any | None = None  # a ProbeResult to use instead of probing (tests)
    watts_per_core: float = DEFAULT_WATTS_PER_CORE
    quality_windows: int = 4
    quality_window_len: int = 256
    use_cache: bool = True
    served_model: str | None = None
    corpus_texts: dict[str, str] = field(default_factory=dict)

    def corpus(self, name: str) -> str:
        if name not in self.corpus_texts:
            from frugallm.lab.corpus import load_corpus

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
        return (p.backend, p.model, p.dtype, p.quant, p.kv, p.device, p.threads)

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
                                  quant=p.quant, kv=p.kv, use_cache=settings.use_cache, n_ctx=n_ctx)
        self.key = key
        return self.runner

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner, self.key = None, None
        gc.collect()


# --------------------------------------------------------------------------------------------- points


class _Metrics:
    """metrics + the reason of every null."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}

    def put(self, key: str, value: Any, reason: str = "") -> None:
        assert key in METRIC_KEYS, key
        self.values[key] = value
        if value is None:
            self.unavailable[key] = reason or "not measured"

    def none(self, keys: Iterable[str], reason: str) -> None:
        for k in keys:
            if k not in self.values:
                self.put(k, None, reason)

    def finish(self) -> tuple[dict[str, Any], dict[str, str]]:
        self.none(METRIC_KEYS, "not measured")
        return {k: self.values[k] for k in METRIC_KEYS}, self.unavailable


def _base_record(p: BenchPoint) -> dict[str, Any]:
    return {"schema": results.SCHEMA_VERSION, "status": "ok", "key": p.key, "label": p.label, "point": p.params(),
            "timestamp": time.time(), "versions": results.package_versions(), "git_commit": results.git_commit()}


def _check_context(p: BenchPoint, cfg: Any) -> Any:
    limit = cfg.max_position_embeddings
    if p.prompt_len + p.gen_len > limit:
        raise FrugalError(f"prompt_len {p.prompt_len} + gen_len {p.gen_len} = {p.prompt_len + p.gen_len} tokens "
                          f"exceeds the context window of {p.model} ({limit} tokens)")
    return cfg


def _latency(m: _Metrics, timings: list[Any], samples: dict[str, list[float]]) -> None:
    for key in LATENCY_KEYS:
        vals = [getattr(t, key) for t in timings if getattr(t, key) is not None]
        samples[key] = vals
        reason = "gen_len 1 has no time per output token" if key == "tpot_s" else "no successful request"
        m.put(key, summarize(vals), reason)


def _utilization(m: _Metrics, rec: dict[str, Any], p: BenchPoint, runner: Runner, hw: HardwareSpec,
                 kv_bytes: int | None) -> None:
    from frugallm.lab.roofline import analyze, measured_utilization

    cfg = runner.config
    abits, compute = _DTYPE_BITS.get(runner.dtype, (32, "fp32"))
    if compute == "fp16" and runner.device == "cpu":
        compute = runner.cpu_fp16_compute
    if compute not in hw.peak_flops:
        compute = "fp32" if "fp32" in hw.peak_flops else next(iter(hw.peak_flops))
    w_eff = m.values["weight_bytes"] * 8 / cfg.num_params
    kv_elems = 2 * cfg.num_layers * cfg.kv_size * p.batch * (p.prompt_len + p.gen_len - 1)
    kv_eff = kv_bytes * 8 / kv_elems if kv_bytes else (runner.kv_bits or abits)
    bits = {"wbits": _nearest_bits(w_eff), "abits": abits, "kvbits": _nearest_bits(kv_eff)}
    # The stored weight dtype picks the attainable GEMV bandwidth (fp16 weights stay fp16 even when the
    # CPU computes in fp32); quantized weights (wbits < 16) fall back to the peak bandwidth.
    stored = _DTYPE_BITS.get(runner.dtype, (32, "fp32"))[1]
    weight_dtype = {32: "fp32", 16: stored if stored in ("bf16", "fp16") else "fp16"}.get(bits["wbits"])
    kw = {"compute_dtype": compute, "weight_dtype": weight_dtype, **bits}
    ttft, tpot = m.values.get("ttft_s"), m.values.get("tpot_s")
    u = measured_utilization(cfg, hw, p.batch, p.prompt_len, p.gen_len, tpot["mean"] if tpot else None,
                             ttft["mean"] if ttft else None, **kw)
    report = analyze(cfg, hw, p.batch, p.prompt_len, p.gen_len, **kw)
    no_tpot = "gen_len 1 has no decode step"
    for key in ("decode_mbu", "decode_mfu", "decode_achieved_gbs", "decode_gemv_efficiency"):
        m.put(key, u[key], no_tpot)
    for key in ("prefill_mbu", "prefill_mfu", "prefill_achieved_flops"):
        m.put(key, u[key])
    m.put("predicted_ttft_s", u["predicted_ttft_s"])
    m.put("predicted_tpot_s", u["predicted_tpot_s"])
    m.put("ttft_over_predicted", ttft["mean"] / u["predicted_ttft_s"] if ttft else None, "no TTFT")
    m.put("tpot_over_predicted", tpot["mean"] / u["predicted_tpot_s"] if tpot else None, no_tpot)
    m.put("predicted_ttft_peak_s", u["predicted_ttft_peak_s"])
    m.put("predicted_tpot_peak_s", u["predicted_tpot_peak_s"])
    m.put("ttft_over_predicted_peak", ttft["mean"] / u["predicted_ttft_peak_s"] if ttft else None, "no TTFT")
    m.put("tpot_over_predicted_peak", tpot["mean"] / u["predicted_tpot_peak_s"] if tpot else None, no_tpot)
    rec["roofline"] = {**bits, "wbits_effective": w_eff, "kvbits_effective": kv_eff, "compute_dtype": compute,
                       "matmul_dtype": report.matmul_dtype, "decode_intensity": report.decode.intensity,
                       "prefill_intensity": report.prefill.intensity, "decode_flops": report.decode.flops,
                       "decode_bytes": report.decode.bytes, "prefill_flops": report.prefill.flops,
                       "prefill_bytes": report.prefill.bytes, "peak_flops": u["peak_flops"],
                       "mem_bandwidth_gbs": u["mem_bandwidth_gbs"], "weight_dtype": report.weight_dtype,
                       "weight_bandwidth_gbs": u["weight_bandwidth_gbs"]}


def _quality(m: _Metrics, rec: dict[str, Any], p: BenchPoint, runner: Runner, settings: BenchSettings) -> None:
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
    q = quality.evaluate(runner.score, runner.tokenizer, model_key=model_key, is_reference=is_ref,
                         make_reference=quality.frugal_reference_scorer(p.model, runner.device, p.threads),
                         corpus_text=settings.corpus(p.corpus), corpus_name=p.corpus,
                         windows=settings.quality_windows, window_len=settings.quality_window_len)
    for k in keys:
        m.put(k, getattr(q, k), "no reference model")
    rec["quality"] = q.to_dict()


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
    rec = _base_record(p)
    m = _Metrics()
    prompts = synthetic_prompts(runner.tokenizer, settings.corpus(p.corpus), p.batch, p.prompt_len)
    for _ in range(p.warmup):
        runner.generate(prompts, p.gen_len)
    cuda = runner.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    meter = make_energy_meter(runner.device, settings.watts_per_core)
    gc.collect()
    load_before = _loadavg()
    rss_hwm_before = peak_rss_bytes()
    timings, walls, kv_bytes = [], [], None
    with RssSampler() as rss:
        e0 = meter.read()
        for _ in range(p.repeat):
            res = runner.generate(prompts, p.gen_len)
            timings += res.requests
            walls.append(res.wall_s)
            kv_bytes = res.kv_cache_bytes
        energy = meter.read() - e0
    samples: dict[str, list[float]] = {}
    _latency(m, timings, samples)
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
    probe = settings.probe if settings.probe is not None else local_probe(runner.device)
    hw = settings.hw or probe.spec
    try:
        _utilization(m, rec, p, runner, hw, kv_bytes)
    except FrugalError as e:  # e.g. a spec without the needed dtype peak
        m.none(("decode_mbu", "decode_mfu", "prefill_mbu", "prefill_mfu", "decode_achieved_gbs",
                "prefill_achieved_flops", "predicted_ttft_s", "predicted_tpot_s", "ttft_over_predicted",
                "tpot_over_predicted", "predicted_ttft_peak_s", "predicted_tpot_peak_s", "ttft_over_predicted_peak",
                "tpot_over_predicted_peak", "decode_gemv_efficiency"), f"roofline: {e}")
    _quality(m, rec, p, runner, settings)
    rec["metrics"], rec["unavailable"] = m.finish()
    rec.update(energy_method=meter.method, samples=samples, hardware=hw.to_dict(),
               machine=results.machine_info(probe), model_config=cfg.to_dict(),
               engine={"backend": runner.backend, "dtype": runner.dtype, "device": runner.device,
                       "threads": torch.get_num_threads(), "quant": p.quant, "kv": p.kv, "model_path": str(runner.path),
                       "reused_loaded_model": cache.reused},
               system_load={"loadavg_1m_before": load_before, "loadavg_1m_after": _loadavg(),
                            "logical_cores": psutil.cpu_count(logical=True)},
               notes=[*NOTES, meter.note, *runner.notes, *_load_note(load_before)])
    return rec


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on this platform
        return None


def _load_note(load: float | None) -> list[str]:
    cores = psutil.cpu_count(logical=True) or 1
    if load is not None and load > 0.5 * cores:
        return [f"the machine was busy (1-min load average {load:.1f} on {cores} logical cores): "
                "timings include contention from other processes"]
    return []


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
    rec = _base_record(p)
    m = _Metrics()
    samples: dict[str, list[float]] = {}
    _latency(m, ok, samples)
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


# ---------------------------------------------------------------------------------------- presentation


def _fmt(v: Any, scale: float = 1.0, spec: str = ".3g") -> str:
    return "-" if v is None else format(v * scale, spec)


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row of headline numbers per record (shared by the terminal table and the Markdown report)."""
    rows = []
    for r in records:
        label = r.get("label") or results.config_label(r.get("point", {}))
        if r.get("status") != "ok":
            rows.append({"config": label, "status": f"error: {r.get('error')}"})
            continue
        m = r["metrics"]
        energy = m.get("energy_per_token_j")
        rows.append({
            "config": label, "status": "ok",
            "TTFT p50 ms": _fmt((m.get("ttft_s") or {}).get("p50"), 1e3),
            "TPOT p50 ms": _fmt((m.get("tpot_s") or {}).get("p50"), 1e3),
            "tok/s": _fmt(m.get("output_tokens_per_s"), 1, ".4g"),
            "TPOT / roofline": _fmt(m.get("tpot_over_predicted")),
            "MBU": _fmt(m.get("decode_mbu"), 1, ".2%") if m.get("decode_mbu") is not None else "-",
            "weights MB": _fmt(m.get("weight_bytes"), 1e-6, ".4g"),
            "KV MB": _fmt(m.get("kv_cache_bytes"), 1e-6, ".3g"),
            "compr.": _fmt(m.get("compression_rate")),
            "ppl": _fmt(m.get("perplexity"), 1, ".4g"),
            "KL": _fmt(m.get("kl_divergence")),
            "J/tok": "-" if energy is None else f"{energy:.3g} ({m.get('energy_method')})",
        })
    return rows


def print_table(records: list[dict[str, Any]], file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = summary_rows(records)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    table = Table(title="frugallm bench")
    for c in cols:
        table.add_column(c, justify="left" if c in ("config", "status") else "right", overflow="fold")
    for row in rows:
        table.add_row(*(row.get(c, "") for c in cols))
    Console(file=file or sys.stdout, width=200).print(table)
