"""Tool calls: the pieces every model family's format shares, parsed into OpenAI ``tool_calls``.

A :class:`ToolFormat` (registered by name in :data:`TOOL_FORMATS`; the families are in
:mod:`frugallm.serve.tool_formats`, which also picks one from a chat template) has three hooks:
:meth:`ToolFormat.parse` (finished text -> content and calls), :meth:`ToolFormat.start` (where calls begin in a
partial text, for streaming) and :meth:`ToolFormat.grammar` (a Lark grammar, llguidance's dialect with ``%json``
schemas, that admits only calls of the given tools in this format: ``tool_choice`` = ``required`` or a named
function is enforced with the structured-output machinery, in the model's own tags). This module holds the call
and spec types, the JSON scanning all formats parse with, the base class and the request's ``tools`` check;
:mod:`frugallm.serve.tool_stream` streams calls as OpenAI deltas.
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
CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def call_at(text: str, pos: int) -> tuple[ToolCall | None, int]:
    """The call whose JSON object starts at ``text[pos:]`` (after blanks) and the index after it; ``(None, -1)``
    when no complete call object is there. ``arguments`` is the model's own text of the arguments object (what
    streaming sends piece by piece), re-serialized only when it was written as a string or before the name."""
    got = json_at(text, pos)
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
    m = CALL_HEAD.match(text, text.index("{", pos))
    raw = json_at(text, m.end()) if m else None
    if raw is not None and raw[0] == args and text[m.end()] == "{":  # type: ignore[union-attr]
        arguments = text[m.end():raw[1]]  # type: ignore[union-attr]
    else:
        arguments = json.dumps(args, ensure_ascii=False)
    return ToolCall(obj["name"], arguments), end


def scan_calls(text: str, pos: int) -> tuple[list[ToolCall], int | None]:
    """The complete call objects from ``pos`` on (each begins at the next ``{`` after the previous one: tags,
    ``,`` / ``;`` separators between them are skipped) and where an unfinished one begins (None if none)."""
    calls = []
    while (pos := text.find("{", pos)) >= 0:
        call, end = call_at(text, pos)
        if call is None:
            return calls, pos
        calls.append(call)
        pos = end
    return calls, None


def json_at(text: str, pos: int) -> tuple[Any, int] | None:
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

