""":class:`ToolStream`: one choice's text deltas as OpenAI chat deltas, in the model's tool-call format: content
as it comes (holding back what may be the start of a call), then per call its id and name, then its arguments
piece by piece (vLLM's shape).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from frugallm.serve.tool_calls import CALL_HEAD, ToolCall, ToolFormat, json_at, scan_calls


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
            calls, partial = scan_calls(self.text, self.start)
        for i in range(self.done, len(calls)):
            self._send(out, i, calls[i].name, calls[i].arguments)
        self.done = max(self.done, len(calls))
        if partial is not None and (m := CALL_HEAD.match(self.text, partial)) is not None:
            try:
                name = json.loads(f'"{m.group(1)}"')
            except ValueError:
                name = None
            if name is not None:
                # The unfinished call's arguments so far: the text after its key while they are an object still
                # open (nothing follows an open object), the object itself once it closed.
                args = ""
                if self.text[m.end():m.end() + 1] == "{":
                    got = json_at(self.text, m.end())
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
