"""Chat templates rendered in jinja2's immutable sandbox, with a time and an output-size limit.

A template inside a model file is untrusted. The sandbox keeps it away from Python's internals, but not from
the machine's memory and time: ``{{ 'a' * 4000000000 }}`` allocates 4 GB (at compile time, by constant
folding) and two nested ``range(100000)`` loops run for hours. :class:`_LimitedSandbox` adds both limits:

* size: every operation that can make a value larger than its inputs (``*``, ``+``, ``%``, ``**``, ``~``,
  ``str.center`` / ``join`` / ``replace`` / ``format`` ..., the ``center`` / ``indent`` / ``join`` /
  ``replace`` / ``batch`` / ``slice`` filters) is checked *before* it runs against the render's budget
  (:attr:`RenderLimits.max_output_chars` plus twice the messages' size), and so is the rendered text;
* time: a trace function on the template's own frames (and every Python call made while it renders) checks
  the clock every few hundred events, so a runaway loop stops after :attr:`RenderLimits.max_seconds`.

Both raise :class:`~frugallm.errors.TemplateError` (HTTP 400 in the server), naming the limit.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from types import BuiltinMethodType, FrameType
from typing import Any

from jinja2 import TemplateError as JinjaTemplateError
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from frugallm.errors import TemplateError

# Used when a model ships no template (ChatML, as llama.cpp and HF fall back to).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render. The size budget is ``max_output_chars`` plus twice the messages' own size (a
    template may repeat them, e.g. a system prompt), so a long prompt is never refused for its length."""

    max_output_chars: int = 4 * 2**20
    max_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.max_output_chars < 1 or not self.max_seconds > 0:
            raise ValueError(f"invalid RenderLimits {self}")


class _LimitExceeded(TemplateError):
    pass


_budget: contextvars.ContextVar[int] = contextvars.ContextVar("chat_template_budget", default=4 * 2**20)
_CHECK_EVERY = 256  # trace events between clock reads


def _size(value: Any, stop: int) -> int:
    """The length of ``str(value)``, estimated without building it (containers walked, strings counted),
    stopping as soon as it exceeds ``stop``. Iterative: a template can nest lists deeper than the stack."""
    total, stack = 0, [value]
    while stack and total <= stop:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, int) and not isinstance(v, bool):
            total += max(1, v.bit_length() * 3 // 10)  # decimal digits
        else:
            total += 8  # floats, None, undefined: short
    return total


def _check(size: int, what: str) -> None:
    budget = _budget.get()
    if size > budget:
        raise _LimitExceeded(
            f"chat template exceeded its output limit: {what} would make about {size:,} characters "
            f"(limit {budget:,}); the model's template is broken or hostile")


def _check_value(value: Any, what: str) -> None:
    _check(_size(value, _budget.get()), what)


def _int(x: Any) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) else 0


def _replace_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    n = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(0, len(new) - len(old))


def _join_size(sep: Any, items: list[Any]) -> int:
    stop = _budget.get()
    return len(sep) * max(0, len(items) - 1) + sum(_size(x, stop) for x in items) if isinstance(sep, str) else 0


def _format_spec_size(fmt: str) -> int:
    """The largest width or precision written in a format string (``{:>99999999}``, ``%99999999s``)."""
    return max((int(d) for d in re.findall(r"\d{6,}", fmt)), default=0)


def _check_binop(op: str, left: Any, right: Any) -> None:
    budget = _budget.get()
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and _int(n) > 0:
                _check(_size(seq, budget) * _int(n), f"{type(seq).__name__} * {n}")
    elif op == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check(_size(left, budget) + _size(right, budget), "concatenation")
    elif op == "**":
        if _int(left) and _int(right) > 0:  # a big power is a big number (and slow to compute)
            _check(abs(left).bit_length() * right // 3, f"{left} ** {right}")
    elif op == "%" and isinstance(left, str):
        args = right if isinstance(right, tuple) else (right,)
        widths = [_int(a) for a in args] if "*" in left else []
        _check(len(left) + _size(right, budget) + max([_format_spec_size(left), *widths]), "'%' formatting")


def _check_str_method(method: Any, args: tuple, kwargs: dict) -> None:
    """Checks ``str`` methods that can grow their result far beyond their inputs."""
    s, name = method.__self__, method.__name__
    if not isinstance(s, str):
        return
    a = [*args, *kwargs.values()]
    if name in ("center", "ljust", "rjust", "zfill") and a:
        _check(_int(a[0]), f"str.{name}({a[0]})")
    elif name == "expandtabs":
        _check(len(s) * max(1, _int(a[0]) if a else 8), "str.expandtabs")
    elif name == "replace" and len(a) >= 2:
        _check(_replace_size(s, *a[:3]), "str.replace")


class _Generator(CodeGenerator):
    """``a ~ b`` (string concatenation of any values) through :meth:`_LimitedSandbox.concat`, size-checked."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _guard_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` with its inputs size-checked first (a filter turning a huge list into a string would allocate
    it), and its size arguments checked against what they would produce."""

    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        i = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # skip the environment / context
        values = args[i:]
        kw = dict(kwargs)
        for v in (*values, *kw.values()):
            _check_value(v, f"the input of filter {name!r}")
        params = [*values[1:], *kw.values()]
        if name == "center" and params:
            _check(_int(params[0]), f"center({params[0]})")
        elif name in ("batch", "slice") and params:
            _check(_int(params[0]), f"{name}({params[0]})")
        elif name == "indent" and values:
            width = params[0] if params else 4
            w = len(width) if isinstance(width, str) else _int(width)
            _check(len(str(values[0])) + (str(values[0]).count("\n") + 1) * w, "indent")
        elif name == "replace" and len(values) >= 3:
            _check(_replace_size(*values[:4]), "replace")
        elif name == "format" and values and isinstance(values[0], str):
            widths = [_int(a) for a in params] if "*" in values[0] else []
            _check(max([_format_spec_size(values[0]), *widths]), "format")
        elif name == "join" and values:
            if not isinstance(values[0], (list, tuple)):
                values[0] = args[i] = list(values[0])  # a generator: materialize (bounded) to measure it
            sep = params[0] if params else kw.get("d", "")
            _check(_join_size(sep, values[0]), "join")
        return f(*args, **kwargs)

    return guarded


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with size checks on every value-growing operation (see the module docstring)."""

    code_generator_class = _Generator
    # Intercepted operators are also never constant-folded at compile time, where 'a' * 4000000000 ran.
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(finalize=self._finalize, **kwargs)

    def _finalize(self, value: Any) -> Any:
        _check_value(value, "an output expression")
        return value

    def concat(self, values: tuple[Any, ...]) -> str:
        _check(sum(_size(v, _budget.get()) for v in values), "'~' concatenation")
        return "".join(map(str, values))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's form
        if isinstance(__obj, BuiltinMethodType):
            if __obj.__name__ == "join" and isinstance(__obj.__self__, str) and args:
                items = list(args[0])
                _check(_join_size(__obj.__self__, items), "str.join")
                args = (items, *args[1:])
            else:
                _check_str_method(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        template = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check(len(template) + _format_spec_size(template) + _size([args, kwargs], _budget.get()),
                   "str.format")
            return fmt(*args, **kwargs)

        return checked


def _raise(message: str) -> None:
    raise TemplateError(f"chat template raised: {message}")


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    env = _LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except JinjaTemplateError as e:
        raise TemplateError(f"chat template does not compile: {e}") from None


def _timed(chunks: Iterator[str], max_seconds: float) -> Iterator[str]:
    """``chunks`` drained under a deadline: a trace function on this thread reads the clock every
    :data:`_CHECK_EVERY` events (each Python call, and each line of the compiled template, loop
    back-jumps included) and raises once it passes. Only this thread is traced, only while rendering."""
    deadline = time.perf_counter() + max_seconds
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks % _CHECK_EVERY == 0 and time.perf_counter() > deadline:
            raise _LimitExceeded(f"chat template exceeded its time limit ({max_seconds:g} s); "
                                 "the model's template is broken or hostile")

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        tick()
        return local

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        tick()
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield from chunks
    finally:
        sys.settrace(previous)


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    limits: RenderLimits = RenderLimits(),  # noqa: B008 - frozen
    **extra: Any,
) -> str:
    """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with ``template`` (ChatML if None), within
    ``limits``. Blocking (up to ``limits.max_seconds``): servers call it from a worker thread."""
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TemplateError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    budget = limits.max_output_chars + 2 * _size([messages, extra], 2**62)
    token = _budget.set(budget)
    try:
        tpl = _compile(template or CHATML_TEMPLATE)
        parts, total = [], 0
        chunks = tpl.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                              bos_token=bos_token, eos_token=eos_token, **extra)
        for part in _timed(chunks, limits.max_seconds):
            total += len(part)
            _check(total, "the rendered text")
            parts.append(part)
        return "".join(parts)
    except SecurityError as e:
        raise TemplateError(f"chat template tried to escape the sandbox: {e}") from None
    except TemplateError:
        raise
    except Exception as e:  # any other failure inside untrusted template code (MemoryError included)
        raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from None
    finally:
        _budget.reset(token)
