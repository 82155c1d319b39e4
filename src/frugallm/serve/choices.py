"""How the two generation endpoints shape the engine's :class:`StepOutput` s into OpenAI choices.

A :class:`ChoiceFormat` turns each step output into a streamed choice (``chunk_choice``) or collects it for one
JSON body (``collect``, then ``final_choices``): :class:`CompletionFormat` (``text``, echo, ``logprobs`` per token
list) and :class:`ChatFormat` (``delta`` / ``message``, ``logprobs.content``, tool calls in the model's format).
:class:`Usage` counts a request's tokens across its choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from frugallm.engine.llm_engine import StepOutput
from frugallm.serve.tool_calls import ToolFormat
from frugallm.serve.tool_stream import ToolStream
from frugallm.tokenizer.tokenizer import Tokenizer


@dataclass
class Usage:
    """Per-request token accounting across choices (a prompt counted once, however many choices it has)."""

    n: int
    prompt: dict[int, int] = field(default_factory=dict)
    cached: dict[int, int] = field(default_factory=dict)
    completion: int = 0

    def add(self, out: StepOutput, returned: bool = True) -> None:
        """Count ``out``; its tokens only when ``returned`` (an echo-only request samples one it drops)."""
        p = out.index // self.n
        self.prompt[p] = out.num_prompt_tokens
        self.cached[p] = max(self.cached.get(p, 0), out.num_cached_tokens)
        self.completion += len(out.token_ids) if returned else 0

    def body(self) -> dict[str, Any]:
        prompt = sum(self.prompt.values())
        return {"prompt_tokens": prompt, "completion_tokens": self.completion,
                "total_tokens": prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}


class ChoiceFormat:
    """How one endpoint shapes choices; ``k`` top logprobs per token, ``None`` when not asked for."""

    object_name: str
    chunk_name: str
    returns_tokens = True  # False: generated tokens are not part of the answer (echo only)

    def __init__(self, tokenizer: Tokenizer, num_choices: int, k: int | None) -> None:
        self.tokenizer, self.num_choices, self.k = tokenizer, num_choices, k

    def tok_str(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def top(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[: self.k or 0]

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Choices sent before any token when streaming."""
        return []

    def chunk_choice(self, out: StepOutput) -> dict[str, Any] | None:
        """The streamed choice for one step output, or None when it carries nothing to send."""
        raise NotImplementedError

    def collect(self, out: StepOutput) -> None:
        raise NotImplementedError

    def final_choices(self, finish: list[str | None]) -> list[dict[str, Any]]:
        raise NotImplementedError


class CompletionFormat(ChoiceFormat):
    object_name, chunk_name = "text_completion", "text_completion"

    def __init__(self, tokenizer: Tokenizer, num_choices: int, k: int | None, echo: list[str] | None,
                 n: int, echo_only: bool = False, prompt_ids: list[list[int]] | None = None) -> None:
        super().__init__(tokenizer, num_choices, k)
        self.echo, self.n, self.echo_only, self.prompt_ids = echo, n, echo_only, prompt_ids or []
        self.returns_tokens = not echo_only
        self.texts = [echo[i // n] if echo else "" for i in range(num_choices)]
        self.offsets = [0] * num_choices  # text offset of each choice's next token (logprobs)
        self.lps: list[dict[str, list]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                            "text_offset": []} for _ in range(num_choices)]

    def logprobs(self, out: StepOutput) -> dict[str, Any]:
        toks, lps, tops, offs = [], [], [], []
        offset = self.offsets[out.index]
        for tid, entry in zip(out.token_ids, out.logprobs or [], strict=False):
            s = self.tok_str(tid)
            toks.append(s)
            lps.append(entry.get(tid))
            top: dict[str, float] = {}
            for t, lp in self.top(entry):  # best first; distinct ids may decode to the same text
                top.setdefault(self.tok_str(t), lp)
            tops.append(top if self.k else None)
            offs.append(offset)
            offset += len(s)
        self.offsets[out.index] = offset
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def prompt_logprobs(self, index: int, entries: list[dict[int, float] | None]) -> dict[str, Any]:
        """The echoed prompt's logprobs (vLLM's shape: the first token has none; text offsets run on)."""
        toks, lps, tops, offs = [], [], [], []
        offset = self.offsets[index]
        for tid, entry in zip(self.prompt_ids[index // self.n], entries, strict=True):
            s = self.tok_str(tid)
            toks.append(s)
            lps.append(None if entry is None else max(entry[tid], -9999.0))
            top: dict[str, float] = {}
            for t, lp in self.top(entry or {}):
                top.setdefault(self.tok_str(t), max(lp, -9999.0))
            tops.append(None if entry is None else top)
            offs.append(offset)
            offset += len(s)
        self.offsets[index] = offset
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def opening_chunks(self) -> list[dict[str, Any]]:
        if not self.echo:
            return []
        return [{"index": i, "text": self.echo[i // self.n], "logprobs": None, "finish_reason": None}
                for i in range(self.num_choices)]

    def chunk_choice(self, out: StepOutput) -> dict[str, Any] | None:
        lp = self.logprobs(out) if self.k is not None else None
        if not (out.text or out.finished or lp):
            return None
        return {"index": out.index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}

    def collect(self, out: StepOutput) -> None:
        if self.k is not None and out.prompt_logprobs is not None:
            self.lps[out.index] = self.prompt_logprobs(out.index, out.prompt_logprobs)
        if self.echo_only:
            return
        self.texts[out.index] += out.text
        if self.k is not None:
            part = self.logprobs(out)
            for key in part:
                self.lps[out.index][key] += part[key]

    def final_choices(self, finish: list[str | None]) -> list[dict[str, Any]]:
        return [{"index": i, "text": self.texts[i], "logprobs": self.lps[i] if self.k is not None else None,
                 "finish_reason": finish[i]} for i in range(self.num_choices)]


class ChatFormat(ChoiceFormat):
    """Chat choices; with ``tools`` (the model's tool-call format) the text is parsed into ``tool_calls``."""

    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer: Tokenizer, num_choices: int, k: int | None, tools: ToolFormat | None = None
                 ) -> None:
        super().__init__(tokenizer, num_choices, k)
        self.texts = [""] * num_choices
        self.lps: list[list[dict[str, Any]]] = [[] for _ in range(num_choices)]
        self.tools = tools
        self.streams = [ToolStream(tools) for _ in range(num_choices)] if tools is not None else []

    def logprobs(self, out: StepOutput) -> list[dict[str, Any]]:
        content = []
        for tid, entry in zip(out.token_ids, out.logprobs or [], strict=False):
            s = self.tok_str(tid)
            content.append({"token": s, "logprob": entry.get(tid), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": (ts := self.tok_str(t)), "logprob": lp,
                                              "bytes": list(ts.encode())} for t, lp in self.top(entry)]})
        return content

    def opening_chunks(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.num_choices)]

    def chunk_choice(self, out: StepOutput) -> dict[str, Any] | None:
        lp = {"content": self.logprobs(out)} if self.k is not None else None
        finish = out.finish_reason
        if self.tools is None:
            delta = {"content": out.text} if out.text else {}
        else:  # content as it comes, each tool call once it is complete (vLLM's delta shape)
            stream = self.streams[out.index]
            delta = stream.step(out.text, out.finished)
            if out.finished and stream.calls and finish == "stop":
                finish = "tool_calls"
        if not (delta or out.finished or lp):
            return None
        return {"index": out.index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def collect(self, out: StepOutput) -> None:
        self.texts[out.index] += out.text
        if self.k is not None:
            self.lps[out.index] += self.logprobs(out)

    def message(self, i: int, finish: str | None) -> tuple[dict[str, Any], str | None]:
        if self.tools is None:
            return {"role": "assistant", "content": self.texts[i]}, finish
        content, calls = self.tools.parse(self.texts[i])
        if not calls:
            return {"role": "assistant", "content": content}, finish
        return ({"role": "assistant", "content": content or None, "tool_calls": [c.body() for c in calls]},
                "tool_calls" if finish == "stop" else finish)

    def final_choices(self, finish: list[str | None]) -> list[dict[str, Any]]:
        out = []
        for i in range(self.num_choices):
            message, reason = self.message(i, finish[i])
            out.append({"index": i, "message": message,
                        "logprobs": {"content": self.lps[i]} if self.k is not None else None,
                        "finish_reason": reason})
        return out

