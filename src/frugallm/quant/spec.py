"""``QuantSpec``: what to quantize and how, parsed from one string such as ``int4:group=32:head``.

Grammar: ``METHOD[:KEY=VALUE | :FLAG]*``.

========================  =====================================================================
``int8``                  per-output-channel symmetric int8, weight only (``int8:group=G`` = group-wise)
``llm.int8``              LLM.int8() int8 x int8 with outlier decomposition; key ``threshold`` (6.0),
                          flag ``zeropoint`` (the paper's zeropoint row quantization instead of absmax)
``int2|int3|int4|int6``   group-wise round-to-nearest; key ``group`` (32/64/128), flags ``sym``/``asym``
``gptq``                  GPTQ; keys ``bits`` (4), ``group``; flags ``act_order``, ``sym``
``auto4``                 int4 with the group size chosen per matrix (FineQuant-style); key ``tol``
``mix4``                  4-bit with a data type chosen per group (BitMoD-style); key ``group``
========================  =====================================================================

Flags accepted by every method: ``embed`` (quantize token embeddings) and ``head`` (quantize lm_head).
A tied lm_head shares the embedding's quantized storage whenever either flag is given. Either flag may
name the tables' bit width, ``head=8`` or ``head=4`` (as llama.cpp keeps ``token_embd`` at Q8_0 in Q4
files); without it embedding tables take 8 bits for 6/8-bit methods and 4 bits otherwise, and an untied
head takes the method itself. Without ``group``
the group size is :data:`DEFAULT_GROUP` for the bit width (32 for 2-3 bits, 64 above).
"""

from __future__ import annotations

from dataclasses import dataclass

from frugallm.errors import FrugalError

GROUP_SIZES = (32, 64, 128)
METHOD_BITS: dict[str, tuple[int, ...]] = {
    "int8": (8,),
    "llm.int8": (8,),
    "int": (2, 3, 4, 6, 8),
    "gptq": (2, 3, 4, 6, 8),
    "auto4": (4,),
    "mix4": (4,),
}
# Defaults divide every hidden size we target (SmolLM2's 576 is not a multiple of 128); lower widths need
# smaller groups to stay usable (int2 at g64 loses most of the signal).
DEFAULT_GROUP = {2: 32, 3: 32, 4: 64, 6: 64, 8: 64}
_COMMON_FLAGS = ("embed", "head")
_KEYS: dict[str, tuple[str, ...]] = {
    "int8": ("group",),
    "llm.int8": ("threshold", "zeropoint"),
    "int": ("group", "sym", "asym", "bits"),
    "gptq": ("bits", "group", "act_order", "sym", "asym"),
    "auto4": ("tol", "sym", "asym"),
    "mix4": ("group",),
}
_FLAGS = {"sym", "asym", "act_order", "embed", "head", "zeropoint"}
EMBED_BITS = (4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """A validated quantization recipe.

    ``group_size`` None means per output channel (``int8``, ``llm.int8``) or chosen per matrix
    (``auto4``). ``threshold`` is the LLM.int8() activation outlier threshold; ``tol`` is how much more weight
    reconstruction error than group 32's (relative) ``auto4`` accepts for a coarser group.
    """

    method: str
    bits: int
    group_size: int | None = None
    symmetric: bool = False
    threshold: float = 6.0
    act_order: bool = False
    include_embeddings: bool = False
    include_lm_head: bool = False
    tol: float = 0.25
    embed_bits: int | None = None  # bit width of embedding/head tables (``head=8``); None: see module doc
    zeropoint: bool = False  # llm.int8: zeropoint (asymmetric) activation rows instead of absmax

    def __post_init__(self) -> None:
        if self.method not in METHOD_BITS:
            raise FrugalError(f"unknown quantization method {self.method!r}; valid: {', '.join(METHOD_BITS)}")
        if self.bits not in METHOD_BITS[self.method]:
            raise FrugalError(
                f"{self.method} does not support {self.bits} bits; supported: {METHOD_BITS[self.method]}"
            )
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise FrugalError(f"group size {self.group_size} is not supported; choose one of {GROUP_SIZES}")
        if self.group_size is None and self.method in ("int", "gptq", "mix4"):
            raise FrugalError(f"{self.method} needs a group size (one of {GROUP_SIZES})")
        if self.group_size is not None and self.method in ("int8", "llm.int8", "auto4"):
            raise FrugalError(f"{self.method} chooses its own grouping; drop group={self.group_size}")
        if not self.threshold > 0:
            raise FrugalError(f"llm.int8 threshold must be > 0, got {self.threshold}")
        if not 0 < self.tol < 1:
            raise FrugalError(f"auto4 tol must be in (0, 1), got {self.tol}")
        if self.act_order and self.method != "gptq":
            raise FrugalError("act_order only applies to gptq")
        if self.zeropoint and self.method != "llm.int8":
            raise FrugalError("zeropoint only applies to llm.int8")
        if self.embed_bits is not None:
            if self.embed_bits not in EMBED_BITS:
                raise FrugalError(f"embedding/head tables support bits {EMBED_BITS}, got {self.embed_bits}")
            if not (self.include_embeddings or self.include_lm_head):
                raise FrugalError("embed_bits needs the embed or head flag")

    def __str__(self) -> str:
        base = {"int": f"int{self.bits}", "gptq": f"gptq:bits={self.bits}"}.get(self.method, self.method)
        parts = [base]
        if self.group_size is not None:
            parts.append(f"group={self.group_size}")
        if self.method == "llm.int8" and self.threshold != 6.0:
            parts.append(f"threshold={self.threshold:g}")
        if self.method == "auto4" and self.tol != QuantSpec.tol:
            parts.append(f"tol={self.tol:g}")
        for flag, on in (("sym", self.symmetric), ("act_order", self.act_order), ("zeropoint", self.zeropoint),
                         ("embed", self.include_embeddings), ("head", self.include_lm_head)):
            if on:
                parts.append(flag if self.embed_bits is None or flag not in ("embed", "head")
                             else f"{flag}={self.embed_bits}")
        return ":".join(parts)


def parse_quant_spec(spec: str) -> QuantSpec:
    """Parse ``"int4:group=32:head"`` and friends (module docstring) into a :class:`QuantSpec`."""
    if not isinstance(spec, str) or not spec.strip():
        raise FrugalError("empty quantization spec; examples: int8, int4:group=32, gptq:bits=4:group=128")
    head, *items = spec.strip().lower().split(":")
    bits: int | None = None
    if head.startswith("int") and head[3:].isdigit():
        bits = int(head[3:])
        method = "int8" if bits == 8 else "int"
        if bits not in METHOD_BITS["int"]:
            raise FrugalError(f"int{bits} is not supported; bit widths: {METHOD_BITS['int']}")
    elif head in METHOD_BITS:
        method = head
    else:
        valid = ["int2", "int3", "int4", "int6", "int8", "llm.int8", "gptq", "auto4", "mix4"]
        raise FrugalError(f"unknown quantization method {head!r} in {spec!r}; valid: {', '.join(valid)}")

    allowed = _KEYS[method] + _COMMON_FLAGS
    values: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in allowed:
            raise FrugalError(f"unknown option {key!r} for {head} in {spec!r}; valid options: {', '.join(allowed)}")
        if key in values:
            raise FrugalError(f"option {key!r} given twice in {spec!r}")
        if (key in _FLAGS) == bool(sep) and not (key in _COMMON_FLAGS and sep):
            form = key if key in _FLAGS else f"{key}=VALUE"
            raise FrugalError(f"option {key!r} in {spec!r} must be written as {form!r}")
        values[key] = value.strip() if sep else None

    def number(key: str, kind: type) -> int | float | None:
        if key not in values:
            return None
        try:
            return kind(values[key])
        except ValueError:
            raise FrugalError(f"option {key}={values[key]!r} in {spec!r} is not a valid {kind.__name__}") from None

    group = number("group", int)
    if method == "int8" and group is not None:
        method = "int"  # int8 with groups is the generic group-wise quantizer at 8 bits
    if "bits" in values:
        if bits is not None:
            raise FrugalError(f"{head} already fixes the bit width; drop bits= from {spec!r}")
        bits = int(number("bits", int))  # type: ignore[arg-type]
    if bits is None:
        bits = 4 if method in ("gptq", "auto4", "mix4", "int") else 8
    if group is None and method in ("int", "gptq", "mix4"):
        group = DEFAULT_GROUP.get(bits, 64)  # unsupported bits are reported by QuantSpec
    table_bits = {number(k, int) for k in _COMMON_FLAGS if values.get(k) is not None}
    if len(table_bits) > 1:
        raise FrugalError(f"embed and head name different bit widths in {spec!r}; the tables share one")
    if "sym" in values and "asym" in values:
        raise FrugalError(f"{spec!r} asks for both sym and asym")
    kwargs: dict[str, object] = {}
    for key, field in (("threshold", "threshold"), ("tol", "tol")):
        if key in values:
            kwargs[field] = float(number(key, float))  # type: ignore[arg-type]
    return QuantSpec(
        method=method,
        bits=bits,
        group_size=group,
        symmetric="sym" in values,
        act_order="act_order" in values,
        include_embeddings="embed" in values,
        include_lm_head="head" in values,
        embed_bits=table_bits.pop() if table_bits else None,
        zeropoint="zeropoint" in values,
        **kwargs,  # type: ignore[arg-type]
    )


def as_spec(spec: QuantSpec | str) -> QuantSpec:
    """``spec`` itself, or parsed when given as a string."""
    return parse_quant_spec(spec) if isinstance(spec, str) else spec
