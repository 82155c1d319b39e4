"""Tool-call formats of model families, registered in :data:`TOOL_FORMATS`, and :func:`format_for` (the one a
chat template writes):

* ``hermes`` (Qwen2.5, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call;
* ``llama3_json`` (Llama 3.1 / 3.2 / 3.3): the whole answer is ``{"name": ..., "parameters": {...}}`` (calls
  separated by ``; ``), optionally after ``<|python_tag|>``;
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.
"""

from __future__ import annotations

import re

from frugallm.errors import InvalidRequestError
from frugallm.serve.tool_calls import TOOL_FORMATS, ToolCall, ToolFormat, ToolSpec, call_at, json_at, scan_calls
from frugallm.tokenizer.tokenizer import Tokenizer


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
            call, pos = call_at(body, pos)
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
            call, end = call_at(text, m.start(1))
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
        got = json_at(text, start + len(self.tag))
        items = got[0] if got else None
        items = [items] if isinstance(items, dict) else items
        calls, rest = scan_calls(text[:got[1]], start + len(self.tag)) if got else ([], None)
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
            call, pos = call_at(s, pos)
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

