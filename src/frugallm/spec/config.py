"""``SpecConfig``: which proposer drafts and how far, parsed from one string such as ``ngram:k=8``.

Grammar: ``METHOD[:KEY=VALUE]*``, like ``--quant``.

==========  ===============================================================================================
``ngram``   prompt lookup: continue from the latest earlier match of the last ``n`` .. ``min_n`` tokens
``draft``   a separate small model with the target's vocabulary: ``model=NAME_OR_PATH`` (required), ``weights=``
            its own weights mode (``auto``, ``stored``, ``stored-q8``, ``dequantize``, as ``LLM(weights=)``;
            default: the target's): ``stored-q8`` runs the draft's decode on int8 activations (faster, not
            exact), which changes only the guesses: the target still verifies every token exactly
``self``    the target's own first ``layers`` layers with its final norm and head (no extra weights)
==========  ===============================================================================================

Keys every method takes: ``k`` (the most tokens drafted per round, 1-14: the verify pass of ``k + 1`` rows
stays below the prefill threshold and within the 16-row native kernels) and ``adaptive`` (``on`` (default):
the draft length follows the measured acceptance and speculation switches itself off when it does not pay;
``off``: always ``k``).
"""

from __future__ import annotations

from dataclasses import dataclass

from frugallm.errors import FrugalError

K_MAX = 14  # k + 1 verify rows < PREFILL_MIN_TOKENS (16): the decode dtype and the multi-row decode kernels
DEFAULT_K = {"ngram": 8, "draft": 4, "self": 4}
# method -> the method-specific keys it accepts
METHOD_KEYS: dict[str, tuple[str, ...]] = {"ngram": ("n", "min_n"), "draft": ("model", "weights"),
                                           "self": ("layers",)}
WEIGHTS = ("auto", "stored", "stored-q8", "dequantize")  # the draft's weights modes (LLM(weights=...))
_COMMON = ("k", "adaptive")
_BOOL = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}
_EXAMPLES = "e.g. ngram:k=8, draft:model=qwen2.5-coder-0.5b:k=4, self:layers=8"


class SpecError(FrugalError):
    """A speculative-decoding spec (``--spec``) is invalid."""


@dataclass(frozen=True)
class SpecConfig:
    """A validated speculative-decoding recipe (see the module docstring for the keys)."""

    method: str
    k: int
    adaptive: bool = True
    n: int = 3
    min_n: int = 1
    model: str | None = None
    layers: int | None = None
    weights: str | None = None  # draft: its weights mode; None: the target's

    def __post_init__(self) -> None:
        if self.method not in METHOD_KEYS:
            raise SpecError(f"unknown speculative method {self.method!r}; valid: {', '.join(METHOD_KEYS)}")
        if not 1 <= self.k <= K_MAX:
            raise SpecError(f"{self.method}: k must be in [1, {K_MAX}] (k + 1 verify rows), got {self.k}")
        if not 1 <= self.min_n <= self.n <= 16:
            raise SpecError(f"ngram: need 1 <= min_n <= n <= 16, got n={self.n}, min_n={self.min_n}")
        if self.method == "draft" and not self.model:
            raise SpecError("draft needs model=NAME_OR_PATH, e.g. draft:model=qwen2.5-coder-0.5b:k=4")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise SpecError(f"draft: weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.layers is not None and self.layers < 1:
            raise SpecError(f"self: layers must be >= 1, got {self.layers}")

    def __str__(self) -> str:
        keys = METHOD_KEYS[self.method]
        extra = "".join(f":{key}={getattr(self, key)}" for key in keys if getattr(self, key) is not None)
        return f"{self.method}:k={self.k}{extra}" + ("" if self.adaptive else ":adaptive=off")


def _int(method: str, key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SpecError(f"{method}: {key} must be an integer, got {raw!r}") from None


def parse_spec(spec: str | SpecConfig | None) -> SpecConfig | None:
    """Parse ``--spec``; ``None``, ``""``, ``"off"`` and ``"none"`` mean no speculation.

    >>> str(parse_spec("draft:model=qwen2.5-coder-0.5b"))
    'draft:k=4:model=qwen2.5-coder-0.5b'
    """
    if spec is None or isinstance(spec, SpecConfig):
        return spec
    text = spec.strip()
    if text.lower() in ("", "off", "none"):
        return None
    method, *items = text.split(":")
    method = method.strip().lower()
    if method not in METHOD_KEYS:
        raise SpecError(f"unknown speculative method {method!r} in {text!r}; valid: {', '.join(METHOD_KEYS)} "
                        f"({_EXAMPLES})")
    valid = (*_COMMON, *METHOD_KEYS[method])
    kw: dict[str, object] = {}
    for item in items:
        key, eq, raw = (s.strip() for s in item.partition("="))
        key = key.lower()
        if not eq or not raw:
            raise SpecError(f"{method}: expected key=value, got {item!r} ({_EXAMPLES})")
        if key not in valid:
            raise SpecError(f"{method} has no key {key!r}; valid: {', '.join(valid)}")
        if key in kw:
            raise SpecError(f"{method}: {key} given twice")
        if key == "adaptive":
            if raw.lower() not in _BOOL:
                raise SpecError(f"{method}: adaptive must be on or off, got {raw!r}")
            kw[key] = _BOOL[raw.lower()]
        elif key == "model":
            kw[key] = raw
        elif key == "weights":
            kw[key] = raw.lower()
        else:
            kw[key] = _int(method, key, raw)
    kw.setdefault("k", DEFAULT_K[method])
    return SpecConfig(method, **kw)  # type: ignore[arg-type]
