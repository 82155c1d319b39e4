"""What ``frugallm bench`` measures: a :class:`BenchPoint`, and sweep files expanded into many of them.

A sweep file (YAML or TOML) names each axis as a scalar or a list; :func:`expand_sweep` crosses them
(models x backends x engine options x batch x prompt/generation length) into point parameter dicts.
Points are validated only when run, so one bad point becomes an error record instead of stopping a sweep.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from frugallm.errors import FrugalError
from frugallm.lab import results
from frugallm.lab.peers import BACKENDS

ALL_BACKENDS = (*BACKENDS, "endpoint")


@dataclass(frozen=True)
class BenchPoint:
    """One configuration to measure; validated at construction (FrugalError names the problem)."""

    model: str = "default"
    backend: str = "frugallm"
    dtype: str = "auto"
    quant: str | None = None
    kv: str | None = None
    spec: str | None = None  # frugallm speculative decoding (--spec); measured beside the same point without it
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
        if self.spec:
            if self.backend != "frugallm":
                raise FrugalError(f"--spec is a frugallm engine option; backend {self.backend} does not take it")
            from frugallm.spec import parse_spec

            parse_spec(self.spec)  # a typo is this point's error record, before any model is loaded

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
               "kvs": "kv", "specs": "spec"}
_ENGINE_KEYS = ("dtype", "quant", "kv", "spec", "device", "threads")


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
    ``batch``/``batches``, ...). ``engine`` is a list of tables of ``dtype``/``quant``/``kv``/``spec``/
    ``device``/``threads``; without it, the ``dtype`` x ``quant`` x ``kv`` x ``spec`` lists are crossed. Other
    keys (repeat,
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
        engines = [{"dtype": d, "quant": q, "kv": k, "spec": sp}
                   for d, q, k, sp in itertools.product(axis("dtype", (defaults or {}).get("dtype", "auto")),
                                                        axis("quant", None), axis("kv", None), axis("spec", None))]
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
