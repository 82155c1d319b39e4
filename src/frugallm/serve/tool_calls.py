"""Tool calls: the model's own format, chosen from its chat template, parsed into OpenAI ``tool_calls``.

A :class:`ToolFormat` (registered by name, :data:`TOOL_FORMATS`) knows one model family's way of writing calls:

* ``hermes`` (Qwen2.5, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call;
* ``llama3_json`` (Llama 3.1 / 3.2 / 3.3): the whole answer is ``{"name": ..., "parameters": {...}}`` (calls
  separated by ``; ``), optionally after ``<|python_tag|>``;
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

Each has three hooks: :meth:`ToolFormat.parse` (finished text -> content and calls), :meth:`ToolFormat.start`
(where calls begin in a partial text, for streaming) and :meth:`ToolFormat.grammar` (a Lark grammar, llguidance's
dialect with ``%json`` schemas, that admits only calls of the given tools in this format: ``tool_choice`` =
``required`` or a named function is enforced with the structured-output machinery, in the model's own tags).
:class:`ToolStream` turns a choice's text deltas into OpenAI deltas: content as it comes (holding back what may
be the start of a call), then per call its id and name, then its arguments piece by piece (vLLM's shape).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from frugallm.errors import InvalidRequestError
from frugallm.registry import Registry
from frugallm.tokenizer.tokenizer import Tokenizer

# Compact JSON inside the grammar: the model cannot loop on blanks, and arguments stay one-line.
_JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; ``arguments`` is JSON text (an object), as OpenAI returns it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolSpec:
    """A request's tool: its name and its parameters' JSON schema (an object schema)."""

    name: str
    parameters: dict[str, Any]


# A call object's head: its name, then its arguments' key (the order every family's template writes).
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _call_at(text: str, pos: int) -> tuple[ToolCall | None, int]:
    """The call whose JSON object starts at ``text[pos:]`` (after blanks) and the index after it; ``(None, -1)``
    when no complete call object is there. ``arguments`` is the model's own text of the arguments object (what
    streaming sends piece by piece), re-serialized only when it was written as a string or before the name."""
    got = _json_at(text, pos)
    if got is None or not isinstance(got[0], dict) or not isinstance(got[0].get("name"), str):
        return None, -1
    obj, end = got
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None, -1
    if not isinstance(args, dict):
        return None, -1
    m = _HEAD.match(text, text.index("{", pos))
    raw = _json_at(text, m.end()) if m else None
    if raw is not None and raw[0] == args and text[m.end()] == "{":  # type: ignore[union-attr]
        arguments = text[m.end():raw[1]]  # type: ignore[union-attr]
    else:
        arguments = json.dumps(args, ensure_ascii=False)
    return ToolCall(obj["name"], arguments), end


def _scan(text: str, pos: int) -> tuple[list[ToolCall], int | None]:
    """The complete call objects from ``pos`` on (each begins at the next ``{`` after the previous one: tags,
    ``,`` / ``;`` separators between them are skipped) and where an unfinished one begins (None if none)."""
    calls = []
    while (pos := text.find("{", pos)) >= 0:
        call, end = _call_at(text, pos)
        if call is None:
            return calls, pos
        calls.append(call)
        pos = end
    return calls, None


def _json_at(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``text[pos:]`` (after blanks) and the index after it, or None."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    try:
        return json.JSONDecoder().raw_decode(text, pos)
    except ValueError:
        return None


class ToolFormat:
    """One family's tool-call syntax. ``args_key``: the arguments' key in a call object; ``tag``: what opens the
    calls in the output (None: a format with no tag); ``needs_special_tokens``: the tag is a control token that
    detokenizing would drop, so the output must keep special tokens."""

    name: ClassVar[str]
    args_key: ClassVar[str] = "arguments"
    tag: ClassVar[str | None] = None
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self, tokenizer: Tokenizer, tool_names: frozenset[str] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.tool_names = tool_names  # the request's tools (a format may recognize untagged calls of them)

    @classmethod
    def matches(cls, template: str) -> bool:
        """Whether a chat template writes tool calls this way."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of a finished output; text that does not parse stays content."""
        raise NotImplementedError

    def start(self, text: str) -> int | None:
        """Index where calls begin in ``text`` (a partial output), or None if they have not (yet)."""
        i = text.find(self.tag) if self.tag else -1
        return None if i < 0 else i

    def held(self, text: str) -> int:
        """How many trailing characters of ``text`` to hold back from content: they may begin the tag."""
        tag = self.tag or ""
        for n in range(min(len(tag) - 1, len(text)), 0, -1):
            if tag.startswith(text[-n:]):
                return n
        return 0

    def grammar(self, tools: list[ToolSpec], parallel: bool = True) -> str:
        """A Lark grammar (llguidance) admitting one call (``parallel``: one or more) of ``tools`` in this
        format, and nothing else."""
        raise NotImplementedError

    # -- grammar pieces -----------------------------------------------------------------------------
    def literal(self, s: str) -> str:
        """``s`` in a grammar: the token id when ``s`` is one token of the vocabulary (a model writes its tags
        as one token, and a control token matches only by id), else a quoted string."""
        tid = self.tokenizer.token_to_id(s)
        return f"<[{tid}]>" if tid is not None else json.dumps(s, ensure_ascii=False)

    def call_schema(self, tools: list[ToolSpec]) -> dict[str, Any]:
        """The JSON schema of one call object of any of ``tools``."""
        return {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, self.args_key: t.parameters},
                           "required": ["name", self.args_key], "additionalProperties": False} for t in tools]}

    @staticmethod
    def json_rule(schema: dict[str, Any]) -> str:
        return "%json " + json.dumps({"x-guidance": _JSON_OPTIONS, **schema}, ensure_ascii=False)


TOOL_FORMATS: Registry[type[ToolFormat]] = Registry("tool-call format")


@TOOL_FORMATS.register("hermes")
class HermesFormat(ToolFormat):
    """Qwen2.5 / Hermes: ``<tool_call>\\n{json}\\n</tool_call>`` per call; text before the first is content.

    Small Qwen2.5 models (the 0.5B coder) often write the same call objects untagged: a ```json fence or bare
    lines. An answer that is nothing but such objects, each naming one of the request's tools, is read as calls
    too (as llama.cpp's Hermes parser does); while an answer may still turn out to be one (it starts with ``{``
    or a ```json fence), streaming holds it back.
    """

    name, tag = "hermes", "<tool_call>"
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
    _fence = re.compile(r"\A\s*```(?:json)?\s*\n(.*?)\n?\s*```\s*\Z", re.DOTALL)

    @classmethod
    def matches(cls, template: str) -> bool:
        return "<tool_call>" in template

    def _untagged(self, text: str) -> list[ToolCall]:
        """Calls of the request's tools written without tags (the whole answer), else []."""
        m = self._fence.match(text)
        body = m.group(1) if m else text
        calls, pos = [], 0
        while body[pos:].strip():
            call, pos = _call_at(body, pos)
            if call is None or call.name not in self.tool_names:
                return []
            calls.append(call)
            while pos < len(body) and body[pos] in " \t\r\n,;":
                pos += 1
        return calls

    def held(self, text: str) -> int:
        s = text.lstrip()
        if self.tool_names and (s.startswith("{") or s.startswith("```json") or "```json".startswith(s)):
            return len(text)  # maybe untagged calls: wait for the whole answer
        return super().held(text)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        start = text.find(self.tag)
        if start < 0:
            calls = self._untagged(text) if self.tool_names else []
            return ("", calls) if calls else (text, [])
        calls = []
        for m in self._block.finditer(text, start):
            call, end = _call_at(text, m.start(1))
            if call is None or end > m.end(1):
                return text, []  # a malformed block: the whole answer is content (as vLLM's hermes parser)
            calls.append(call)
        return text[:start].rstrip("\n"), calls

    def grammar(self, tools: list[ToolSpec], parallel: bool = True) -> str:
        call = f'{self.literal("<tool_call>")} "\\n" obj "\\n" {self.literal("</tool_call>")}'
        more = ' ("\\n" call)*' if parallel else ""
        # A newline may end the answer too: Qwen writes one after </tool_call> before <|im_end|> or the next call.
        return f'start: call{more} "\\n"?\ncall: {call}\nobj: {self.json_rule(self.call_schema(tools))}\n'


@TOOL_FORMATS.register("mistral")
class MistralFormat(ToolFormat):
    """Mistral: ``[TOOL_CALLS]`` then a JSON array of call objects (a control token: kept in the text)."""

    name, tag, needs_special_tokens = "mistral", "[TOOL_CALLS]", True

    @classmethod
    def matches(cls, template: str) -> bool:
        return "[TOOL_CALLS]" in template

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        start = text.find(self.tag)
        if start < 0:
            return text, []
        got = _json_at(text, start + len(self.tag))
        items = got[0] if got else None
        items = [items] if isinstance(items, dict) else items
        calls, rest = _scan(text[:got[1]], start + len(self.tag)) if got else ([], None)
        if not isinstance(items, list) or not items or rest is not None or len(calls) != len(items):
            return text, []
        return text[:start].rstrip(), calls

    def grammar(self, tools: list[ToolSpec], parallel: bool = True) -> str:
        arr = {"type": "array", "items": self.call_schema(tools), "minItems": 1}
        if not parallel:
            arr["maxItems"] = 1
        return f"start: {self.literal('[TOOL_CALLS]')} arr\narr: {self.json_rule(arr)}\n"


@TOOL_FORMATS.register("llama3_json")
class Llama3JsonFormat(ToolFormat):
    """Llama 3.x: the answer is ``{"name": ..., "parameters": {...}}`` (several joined by ``; ``), optionally
    after ``<|python_tag|>``; an answer that is not such JSON is content."""

    name, args_key = "llama3_json", "parameters"
    _python_tag = "<|python_tag|>"

    @classmethod
    def matches(cls, template: str) -> bool:
        return "<|python_tag|>" in template or '"parameters": dictionary of argument name' in template

    def _body(self, text: str) -> tuple[int, str]:
        s = text.lstrip()
        if s.startswith(self._python_tag):
            s = s[len(self._python_tag):].lstrip()
        return len(text) - len(s), s

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        _, s = self._body(text)
        calls: list[ToolCall] = []
        pos = 0
        while pos < len(s):
            call, pos = _call_at(s, pos)
            if call is None:
                return text, []
            calls.append(call)
            rest = s[pos:].lstrip()
            if not rest:
                break
            if not rest.startswith(";"):
                return text, []
            pos = len(s) - len(rest) + 1
        return ("", calls) if calls else (text, [])

    def start(self, text: str) -> int | None:
        off, s = self._body(text)
        return off if s.startswith("{") else None

    def held(self, text: str) -> int:
        s = text.lstrip()
        # Until the first character after blanks (and the python tag) shows, the answer may be a call.
        if not s or self._python_tag.startswith(s) or s == self._python_tag:
            return len(text)
        if s.startswith(self._python_tag) and not s[len(self._python_tag):].strip():
            return len(text)
        return 0

    def grammar(self, tools: list[ToolSpec], parallel: bool = True) -> str:
        more = ' ("; " obj)*' if parallel else ""
        return f"start: obj{more}\nobj: {self.json_rule(self.call_schema(tools))}\n"


def format_for(template: str | None, tokenizer: Tokenizer, tool_names: frozenset[str] = frozenset()) -> ToolFormat:
    """The tool-call format a chat template uses (for a request with these tools); a template that writes none
    is a 400 naming it."""
    for name in TOOL_FORMATS.names():
        cls = TOOL_FORMATS.get(name)
        if template and cls.matches(template):
            return cls(tokenizer, tool_names)
    raise InvalidRequestError(
        "tools: this model's chat template has no tool-call format this server parses (known: "
        f"{', '.join(TOOL_FORMATS.names())}; the template must mention <tool_call>, [TOOL_CALLS] or <|python_tag|>)",
        "tools")


def tool_specs(tools: list[dict[str, Any]]) -> list[ToolSpec]:
    """The request's ``tools`` (``[{"type": "function", "function": {"name", "parameters"}}]``, already
    shape-checked) as specs; a parameters schema that is not an object schema is a 400 naming the tool."""
    specs, seen = [], set()
    for i, t in enumerate(tools):
        fn = t["function"]
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise InvalidRequestError(
                f"tools[{i}] ({fn['name']!r}): function.parameters must be a JSON schema of type 'object', "
                f"got {json.dumps(params)[:80]}", "tools")
        if fn["name"] in seen:
            raise InvalidRequestError(f"tools[{i}]: the function name {fn['name']!r} is given twice", "tools")
        seen.add(fn["name"])
        specs.append(ToolSpec(fn["name"], params))
    return specs


class ToolStream:
    """One choice's text deltas -> OpenAI chat deltas in the model's format, as vLLM streams them: content as it
    comes (holding back what may begin a call), then per call a first delta with its ``id``, ``type`` and
    ``function.name``, then ``function.arguments`` pieces as the model writes them. Concatenated, the pieces are
    the ``arguments`` of the same answer unstreamed."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.text = ""
        self.sent = 0  # characters of ``text`` sent as content
        self.start: int | None = None  # where calls begin
        self.ids: list[str] = []  # one per call whose first delta went out
        self.args: list[str] = []  # arguments text sent per call
        self.done = 0  # calls sent whole

    @property
    def calls(self) -> list[str]:
        """Ids of the calls sent so far."""
        return self.ids

    def _send(self, out: dict[int, dict[str, Any]], i: int, name: str, args: str) -> None:
        """Bring call ``i`` up to ``name`` and ``args`` (a longer prefix of its arguments) in ``out``."""
        entry = out.setdefault(i, {"index": i})
        if i == len(self.ids):
            self.ids.append(f"chatcmpl-tool-{uuid.uuid4().hex}")
            self.args.append("")
            entry.update(id=self.ids[i], type="function", function={"name": name, "arguments": ""})
        if args.startswith(self.args[i]) and len(args) > len(self.args[i]):
            fn = entry.setdefault("function", {})
            fn["arguments"] = fn.get("arguments", "") + args[len(self.args[i]):]
            self.args[i] = args

    def _calls_delta(self, final: list[ToolCall] | None = None) -> list[dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        if final is not None:
            calls, partial = final, None
        else:
            assert self.start is not None
            calls, partial = _scan(self.text, self.start)
        for i in range(self.done, len(calls)):
            self._send(out, i, calls[i].name, calls[i].arguments)
        self.done = max(self.done, len(calls))
        if partial is not None and (m := _HEAD.match(self.text, partial)) is not None:
            try:
                name = json.loads(f'"{m.group(1)}"')
            except ValueError:
                name = None
            if name is not None:
                # The unfinished call's arguments so far: the text after its key while they are an object still
                # open (nothing follows an open object), the object itself once it closed.
                args = ""
                if self.text[m.end():m.end() + 1] == "{":
                    got = _json_at(self.text, m.end())
                    args = self.text[m.end():got[1]] if got else self.text[m.end():]
                self._send(out, len(calls), name, args)
        return [out[i] for i in sorted(out) if len(out[i]) > 1]  # entries with more than their index

    def feed(self, delta: str) -> dict[str, Any]:
        """The delta to send for ``delta`` (``{}`` when nothing is ready)."""
        self.text += delta
        out: dict[str, Any] = {}
        if self.start is None:
            start = self.fmt.start(self.text)
            end = start if start is not None else len(self.text) - self.fmt.held(self.text)
            if end > self.sent:
                out["content"] = self.text[self.sent:end]
                self.sent = end
            self.start = start
        if self.start is not None and (tc := self._calls_delta()):
            out["tool_calls"] = tc
        return out

    def step(self, delta: str, finished: bool) -> dict[str, Any]:
        """:meth:`feed`, then :meth:`finish` when the choice ended, as one delta (one entry per call)."""
        out = self.feed(delta)
        if not finished:
            return out
        last = self.finish()
        if "content" in last:
            out["content"] = out.get("content", "") + last["content"]
        merged: dict[int, dict[str, Any]] = {}
        for tc in out.get("tool_calls", []) + last.get("tool_calls", []):
            cur = merged.setdefault(tc["index"], {})
            fn = {**cur.get("function", {})}
            for k, v in tc.get("function", {}).items():
                fn[k] = fn.get(k, "") + v if k == "arguments" else v
            cur.update({k: v for k, v in tc.items() if k != "function"}, function=fn)
        if merged:
            out["tool_calls"] = [merged[i] for i in sorted(merged)]
        return out

    def finish(self) -> dict[str, Any]:
        """The last delta once the choice has ended: what remains of the calls, or (text that never parsed as
        calls) the rest as content."""
        _, calls = self.fmt.parse(self.text)
        if calls:
            tc = self._calls_delta(calls)
            return {"tool_calls": tc} if tc else {}
        if self.ids:
            return {}  # calls went out but the whole does not parse (cut at max_tokens): nothing to add
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return {"content": rest} if rest else {}
