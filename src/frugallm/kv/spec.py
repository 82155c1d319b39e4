"""Parse ``--kv`` specs: ``name[:param=value,...][+name[:...]]``, e.g. ``snapkv:budget=0.25+kivi:bits=2``.

``""``, ``"full"`` and ``"none"`` mean the plain uncompressed cache. A spec holds at most one policy
per role (eviction, quantization, key-channel pruning, prompt selection); anything else raises a
:class:`~frugallm.kv.policy.KVSpecError` that says why.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from frugallm.errors import FrugalError
from frugallm.kv.policy import KV_POLICIES, KVPolicy, KVSpecError

PLAIN = ("", "full", "none")

# flag -> (plural for messages, why two cannot compose)
_ROLES = {
    "evicts": ("eviction policies", "each keeps its own set of tokens under its own budget, and the union or "
               "intersection of two such sets would honour neither"),
    "quantizes": ("quantizers", "each decides the storage format of every token, so only one can apply"),
    "prunes_channels": ("key-channel pruners", "each picks its own key channels per head"),
    "selects_prompt": ("prompt selectors", "the second would filter an already filtered prompt"),
}
_EXAMPLE = "compose at most one of each role, e.g. snapkv:budget=0.25+kivi:bits=2"


@dataclass(frozen=True)
class KVSpec:
    """A validated composition of KV policies (at most one per role)."""

    policies: tuple[KVPolicy, ...] = ()

    def __post_init__(self) -> None:
        for flag, (plural, why) in _ROLES.items():
            same = [p.name for p in self.policies if getattr(p, flag)]
            if len(same) > 1:
                raise KVSpecError(f"{' and '.join(same)} are both {plural}: {why}; {_EXAMPLE}")
        q, pr = self.quantizer, self.pruner
        if q is not None and pr is not None and q.needs_layer_input:
            raise KVSpecError(f"{pr.name} prunes key channels but {q.name} stores the layer input X, not keys; "
                              f"use {pr.name} with kivi or alone")
        ev = self.evictor
        if pr is not None and ev is not None and ev.evicts_during_decode:
            raise KVSpecError(f"{pr.name} keeps generated keys full width and the prompt's keys pruned, but "
                              f"{ev.name} evicts during decoding across both; compose {pr.name} with snapkv "
                              "(prefill-time eviction) and/or kivi")

    def _role(self, flag: str) -> KVPolicy | None:
        return next((p for p in self.policies if getattr(p, flag)), None)

    @property
    def evictor(self):  # noqa: ANN201 - Evictor | None
        return self._role("evicts")

    @property
    def quantizer(self):  # noqa: ANN201 - Quantizer | None
        return self._role("quantizes")

    @property
    def pruner(self):  # noqa: ANN201 - ChannelPruner | None
        return self._role("prunes_channels")

    @property
    def selector(self):  # noqa: ANN201 - PromptSelector | None
        return self._role("selects_prompt")

    @property
    def changes_positions(self) -> bool:
        return any(p.changes_positions for p in self.policies)

    @property
    def compresses_cache(self) -> bool:
        """True when the cache itself differs from the plain one (a prompt selector alone does not)."""
        return any(p.evicts or p.quantizes or p.prunes_channels for p in self.policies)

    def __str__(self) -> str:
        return "+".join(p.describe() for p in self.policies) or "full"


def _convert(policy: str, param: str, hint: object, raw: str) -> object:
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if optional and raw.lower() == "none":
        return None
    try:
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
    except ValueError:
        kind = "an integer" if base is int else "a number"
        raise KVSpecError(f"{policy}: {param} must be {kind}, got {raw!r}") from None
    return raw


def parse_policy(part: str) -> KVPolicy:
    """One ``name[:param=value,...]`` term."""
    name, _, params = part.partition(":")
    try:
        cls = KV_POLICIES.get(name.strip().lower())
    except FrugalError as e:
        raise KVSpecError(f"{e} (in KV spec term {part!r})") from None
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip().lower()
        if not eq or not raw.strip():
            raise KVSpecError(f"{cls.name}: expected param=value, got {item!r}")
        if key not in fields:
            raise KVSpecError(f"{cls.name} has no parameter {key!r}; valid: {', '.join(sorted(fields))}")
        kwargs[key] = _convert(cls.name, key, hints[key], raw.strip())
    return cls(**kwargs)


def parse_kv_spec(spec: str | KVSpec | None) -> KVSpec:
    """Parse and validate a spec; a :class:`KVSpec` is returned unchanged.

    >>> str(parse_kv_spec("snapkv:budget=0.1+kivi:bits=4"))
    'snapkv:budget=0.1+kivi:bits=4'
    """
    if isinstance(spec, KVSpec):
        return spec
    text = (spec or "").strip()
    if text.lower() in PLAIN:
        return KVSpec()
    parts = text.split("+")
    if any(not p.strip() for p in parts):
        raise KVSpecError(f"empty policy in KV spec {text!r}; write e.g. snapkv:budget=0.25+kivi:bits=2")
    return KVSpec(tuple(parse_policy(p) for p in parts))


def paged_names() -> list[str]:
    """Policies the continuous-batching engine runs (their ``pages`` flag)."""
    return [n for n in KV_POLICIES.names() if KV_POLICIES.get(n).pages]


def paged_policy(spec: str | KVSpec | None):  # noqa: ANN201 - Evictor | None
    """The evictor the paged engine runs for ``spec`` (None: none); a spec it cannot run is a :class:`KVSpecError`
    naming the policies that do run under batching. Besides an evictor alone, the engine runs a quantizer that
    ``pages`` (KIVI, packed in the pool: :func:`paged_quantizer`) alone or after an evictor that compresses only
    at prefill (``snapkv:budget=0.25+kivi:bits=2``)."""
    spec = parse_kv_spec(spec)
    if not spec.policies:
        return None
    ev, q = spec.evictor, spec.quantizer
    if all(p.pages for p in spec.policies) and (len(spec.policies) == 1 or (
            len(spec.policies) == 2 and ev is not None and q is not None)):
        if ev is not None and q is not None and (ev.evicts_during_decode or getattr(ev, "needs_draft", False)):
            raise KVSpecError(f"kv={spec}: {q.name} composes under continuous batching only with an evictor that "
                              f"compresses at prefill alone (snapkv), not {ev.name}")
        for p in spec.policies:
            why = p.paging_error()
            if why is not None:
                raise KVSpecError(f"kv={spec}: {why}")
        return ev
    others = [p.name for p in spec.policies if not p.pages]
    why = f"{', '.join(others)} cannot" if others else "these policies cannot be composed there"
    raise KVSpecError(f"kv={spec}: {why} run under continuous batching yet; policies that do: "
                      f"{', '.join(paged_names())} (an evictor alone, kivi alone, or snapkv+kivi); the others run "
                      "single-stream through LLM(kv=...)")


def paged_quantizer(spec: str | KVSpec | None):  # noqa: ANN201 - Quantizer | None
    """The quantizer the paged engine packs into its pool for ``spec`` (None: none); checked as :func:`paged_policy`."""
    paged_policy(spec)
    return parse_kv_spec(spec).quantizer
