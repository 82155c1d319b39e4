"""A 1,000-request soak of a live server (issue 16, "Done when"): valid work mixed with bad input of every kind the
issue lists, from 16 concurrent clients, against a queue cap small enough that 429s are routine.

Every valid request must end in a 200 with a complete answer (greedy ones equal to the offline ``LLM.generate``
text; a 429 is retried as a client would, after checking its ``Retry-After``); every bad one in the expected 4xx
with an OpenAI error body naming the problem; nothing in a 5xx. At the end ``/metrics`` agrees with what the
clients saw (status counts, finished / aborted requests, prompt and generated tokens), no KV block or admitted
sequence is left, and no thread outlives the server. ``FRUGALLM_SOAK_REQUESTS`` changes the count.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from frugallm import LLM, SamplingParams
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.serve.app import create_app, default_allowed_hosts

pytestmark = pytest.mark.usefixtures("one_thread")

N_REQUESTS = int(os.environ.get("FRUGALLM_SOAK_REQUESTS", "1000"))
CLIENTS = 16
MAX_QUEUE = 8  # sequences: 16 clients sending n <= 3 pass it all the time
MAX_NUM_SEQS = 8
MAX_BODY = 64 * 1024
KEY = "soak-key"
MODEL = "tiny"
MT = 6  # completion tokens of the checked greedy answers
HANGUP_TOKENS = 200  # long enough to be running when its client leaves
MAX_RETRIES = 1000
# The whole soak's time: past it every client gives up (a stuck server fails fast, not at CI's time limit).
BUDGET_S = float(os.environ.get("FRUGALLM_SOAK_BUDGET_S", "240"))

PROMPTS = ["The cat sat on", "Once upon a time", "def add(a, b):", "1, 2, 3,", "Hello world", "Paris is",
           "Numbers: 7 8", "The quick brown fox"]
TOKEN_PROMPTS = [[5, 6, 7, 8], [40, 41], [100, 101, 102]]
# The model's template, preceded by two hostile branches a message can trigger (issue 16 #5): a 4 GB string
# (refused before it is built) and two nested 100,000-step loops (stopped by the time limit).
HOSTILE = ("{% if messages[-1]['content'] == 'SIZE-BOMB' %}{{ 'a' * 4000000000 }}{% endif %}"
           "{% if messages[-1]['content'] == 'LOOP-BOMB' %}{% for i in range(100000) %}{% for j in range(100000) %}"
           "{% endfor %}{% endfor %}{% endif %}")
LOOP_BOMBS = 2  # each runs the template's 2 s time limit: a fixed few, not a share of the soak


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


@dataclass(frozen=True)
class Refs:
    """Greedy answers computed offline, before the server runs (``MT`` tokens, ``ignore_eos``)."""

    text: dict[str, str]
    prompt_tokens: dict[str, int]
    chat: dict[str, str]
    tokens: dict[tuple[int, ...], str]
    stop: dict[str, str]  # a prompt -> a stop string inside its greedy answer (not at its start)


def make_refs(llm: LLM) -> Refs:
    sp = SamplingParams(max_tokens=MT, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp)
    chats = llm.generate([llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS], sp)
    toks = llm.generate(TOKEN_PROMPTS, sp)
    stop = {}
    for p, o in zip(PROMPTS, outs, strict=True):
        for i in range(1, len(o.text) - 1):
            s = o.text[i:i + 2]
            if "\ufffd" not in s and s.strip() and o.text.find(s) == i:
                stop[p] = s
                break
    return Refs({p: o.text for p, o in zip(PROMPTS, outs, strict=True)},
                {p: len(o.prompt_token_ids) for p, o in zip(PROMPTS, outs, strict=True)},
                {p: o.text for p, o in zip(PROMPTS, chats, strict=True)},
                {tuple(p): o.text for p, o in zip(TOKEN_PROMPTS, toks, strict=True)}, stop)


@dataclass
class Outcome:
    kind: str
    valid: bool  # True: must be answered (200); False: must be refused (4xx)
    status: int = 0
    problem: str = ""  # empty when the answer was right
    seqs: int = 0  # sequences the engine finished for it (valid generation requests)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    hangup_prompt: str | None = None
    seen: list[int] = field(default_factory=list)  # every status the server sent for it (429s included)


class ClientPool:
    """One keep-alive client per worker thread (a new ``httpx.Client`` per request costs more than the request)."""

    def __init__(self, base: str) -> None:
        self.base, self.local, self.clients, self.lock = base, threading.local(), [], threading.Lock()
        self.deadline = time.time() + BUDGET_S

    def get(self) -> httpx.Client:
        c = getattr(self.local, "client", None)
        if c is None:
            c = self.local.client = httpx.Client(base_url=self.base, timeout=30,
                                                 headers={"Authorization": f"Bearer {KEY}"})
            with self.lock:
                self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()


class Soaker:
    """One request's client; everything it sends goes through :meth:`call` / :meth:`stream` (429s retried)."""

    def __init__(self, c: httpx.Client, rng: random.Random, out: Outcome, deadline: float) -> None:
        self.c, self.rng, self.out, self.deadline = c, rng, out, deadline

    def _retry_wait(self, r: httpx.Response) -> None:
        if time.time() > self.deadline:
            raise AssertionError(f"still 429 when the soak's {BUDGET_S} s were up (admissions never released?)")
        body = r.json()
        assert r.headers.get("retry-after", "").isdigit() and int(r.headers["retry-after"]) >= 1, r.headers
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full", body
        time.sleep(self.rng.uniform(0.005, 0.03))  # Retry-After says 1 s; shortened to keep the soak short

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> httpx.Response:
        content = raw if raw is not None else None if body is None else json.dumps(body).encode()
        hdrs = {"content-type": "application/json", **(headers or {})} if content is not None else headers
        for _ in range(MAX_RETRIES):
            r = self.c.request(method, path, content=content, headers=hdrs)
            self.out.seen.append(r.status_code)
            if r.status_code != 429:
                return r
            self._retry_wait(r)
        raise AssertionError(f"{path}: still 429 after {MAX_RETRIES} tries")

    @contextlib.contextmanager
    def open_stream(self, path: str, body: dict[str, Any]) -> Iterator[httpx.Response]:
        """A streamed request's open response (its body unread), the request sent again past 429s."""
        for _ in range(MAX_RETRIES):
            with self.c.stream("POST", path, content=json.dumps(body).encode(),
                               headers={"content-type": "application/json"}) as r:
                self.out.seen.append(r.status_code)
                if r.status_code != 429:
                    yield r
                    return
                r.read()
                self._retry_wait(r)
        raise AssertionError(f"{path}: still 429 after {MAX_RETRIES} tries")

    def stream(self, path: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
        """SSE events of a streamed request (``[DONE]`` as the string), retried past 429s."""
        with self.open_stream(path, body) as s:
            if s.status_code != 200:
                s.read()
                return s.status_code, [s.json()]
            return 200, [ln[6:] if ln == "data: [DONE]" else json.loads(ln[6:])
                         for ln in s.iter_lines() if ln.startswith("data: ")]


# -- valid requests: each returns a problem ("" when the answer is complete and right) ------------------------
def _usage_ok(o: Outcome, usage: dict[str, Any], completion: int | None) -> str:
    if completion is not None and usage["completion_tokens"] != completion:
        return f"usage {usage} != {completion} completion tokens"
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return f"usage does not add up: {usage}"
    o.prompt_tokens += usage["prompt_tokens"]
    o.completion_tokens += usage["completion_tokens"]
    return ""


def v_greedy(s: Soaker, refs: Refs) -> str:
    p = s.rng.choice(PROMPTS)
    r = s.call("POST", "/v1/completions", {"model": MODEL, "prompt": p, "max_tokens": MT, "temperature": 0,
                                            "ignore_eos": True})
    s.out.status = r.status_code
    if r.status_code != 200:
        return r.text[:200]
    j = r.json()
    ch = j["choices"]
    s.out.seqs = 1
    if len(ch) != 1 or ch[0]["text"] != refs.text[p] or ch[0]["finish_reason"] != "length":
        return f"{p!r}: {ch} != {refs.text[p]!r}"
    if j["usage"]["prompt_tokens"] != refs.prompt_tokens[p]:
        return f"prompt tokens {j['usage']} != {refs.prompt_tokens[p]}"
    return _usage_ok(s.out, j["usage"], MT)


def _stream_check(s: Soaker, events: list[Any], n: int, chat: bool, completion: int | None) -> tuple[str, list[str]]:
    """Problems of a streamed answer with ``n`` choices, and each choice's text."""
    if len(events) < 2 or events[-1] != "[DONE]":
        return f"stream did not end with [DONE]: {events[-2:]}", []
    usage = events[-2]
    if usage.get("choices") != [] or not usage.get("usage"):
        return f"no usage chunk: {usage}", []
    texts, finish = [""] * n, [None] * n
    for e in events[:-2]:
        if "error" in e:
            return f"error event: {e}", []
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "") if chat else c["text"]
            if c["finish_reason"] is not None:
                finish[c["index"]] = c["finish_reason"]
    if chat and events[0]["choices"][0]["delta"].get("role") != "assistant":
        return f"first chat chunk has no role: {events[0]}", []
    if None in finish:
        return f"a choice never finished: {finish}", []
    return _usage_ok(s.out, usage["usage"], completion), texts


def v_greedy_stream(s: Soaker, refs: Refs) -> str:
    p = s.rng.choice(PROMPTS)
    status, events = s.stream("/v1/completions", {"prompt": p, "max_tokens": MT, "temperature": 0, "stream": True,
                                                  "ignore_eos": True, "stream_options": {"include_usage": True}})
    s.out.status, s.out.seqs = status, 1
    if status != 200:
        return str(events)[:200]
    problem, texts = _stream_check(s, events, 1, False, MT)
    return problem or ("" if texts == [refs.text[p]] else f"{p!r}: {texts} != {refs.text[p]!r}")


def v_stop(s: Soaker, refs: Refs) -> str:
    p = s.rng.choice(sorted(refs.stop))
    stop = refs.stop[p]
    r = s.call("POST", "/v1/completions", {"prompt": p, "max_tokens": MT, "temperature": 0, "ignore_eos": True,
                                            "stop": [stop, "never-seen-stop"]})
    s.out.status, s.out.seqs = r.status_code, 1
    if r.status_code != 200:
        return r.text[:200]
    ch = r.json()["choices"][0]
    want = refs.text[p][:refs.text[p].find(stop)]
    if ch["text"] != want or ch["finish_reason"] != "stop":
        return f"stop {stop!r} on {refs.text[p]!r}: {ch}"
    return _usage_ok(s.out, r.json()["usage"], None)


def v_chat(s: Soaker, refs: Refs) -> str:
    p = s.rng.choice(PROMPTS)
    r = s.call("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": p}], "max_tokens": MT,
                                                 "temperature": 0, "ignore_eos": True})
    s.out.status, s.out.seqs = r.status_code, 1
    if r.status_code != 200:
        return r.text[:200]
    ch = r.json()["choices"]
    if len(ch) != 1 or ch[0]["message"] != {"role": "assistant", "content": refs.chat[p]}:
        return f"{p!r}: {ch} != {refs.chat[p]!r}"
    return _usage_ok(s.out, r.json()["usage"], MT)


def v_chat_stream(s: Soaker, refs: Refs) -> str:
    n = s.rng.choice([1, 2])
    status, events = s.stream("/v1/chat/completions", {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": s.rng.choice(PROMPTS)}],
        "max_tokens": MT, "temperature": 0.8, "seed": s.rng.randrange(2**32), "n": n, "stream": True,
        "stream_options": {"include_usage": True}})
    s.out.status, s.out.seqs = status, n
    if status != 200:
        return str(events)[:200]
    return _stream_check(s, events, n, True, None)[0]


def v_n(s: Soaker, refs: Refs) -> str:
    n = s.rng.choice([2, 3])
    r = s.call("POST", "/v1/completions", {"prompt": s.rng.choice(PROMPTS), "max_tokens": MT, "n": n,
                                            "temperature": 1.0, "seed": s.rng.randrange(2**32), "ignore_eos": True})
    s.out.status, s.out.seqs = r.status_code, n
    if r.status_code != 200:
        return r.text[:200]
    ch = r.json()["choices"]
    if [c["index"] for c in ch] != list(range(n)) or any(c["finish_reason"] != "length" for c in ch):
        return f"choices {ch}"
    return _usage_ok(s.out, r.json()["usage"], n * MT)


def v_seed(s: Soaker, refs: Refs) -> str:
    """A seeded sample is the same whatever else runs beside it."""
    body = {"prompt": s.rng.choice(PROMPTS), "max_tokens": MT, "temperature": 1.0, "top_p": 0.9,
            "seed": s.rng.randrange(2**63), "ignore_eos": True}
    texts = []
    for _ in range(2):
        r = s.call("POST", "/v1/completions", body)
        s.out.status = r.status_code
        if r.status_code != 200:
            return r.text[:200]
        s.out.seqs += 1
        if problem := _usage_ok(s.out, r.json()["usage"], MT):
            return problem
        texts.append(r.json()["choices"][0]["text"])
    return "" if texts[0] == texts[1] else f"seed {body['seed']}: {texts}"


def v_logprobs(s: Soaker, refs: Refs) -> str:
    if s.rng.random() < 0.5:
        r = s.call("POST", "/v1/completions", {"prompt": s.rng.choice(PROMPTS), "max_tokens": MT, "temperature": 0,
                                                "logprobs": 3, "ignore_eos": True})
        s.out.status, s.out.seqs = r.status_code, 1
        if r.status_code != 200:
            return r.text[:200]
        lp = r.json()["choices"][0]["logprobs"]
        if not len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == MT:
            return f"logprobs lengths: {lp}"
        if any(lp["token_logprobs"][i] != max(lp["top_logprobs"][i].values()) for i in range(MT)):
            return f"greedy token is not the top logprob: {lp}"
    else:
        r = s.call("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": s.rng.choice(PROMPTS)}],
                                                     "max_tokens": MT, "logprobs": True, "top_logprobs": 2,
                                                     "ignore_eos": True})
        s.out.status, s.out.seqs = r.status_code, 1
        if r.status_code != 200:
            return r.text[:200]
        content = r.json()["choices"][0]["logprobs"]["content"]
        if len(content) != MT or any(len(c["top_logprobs"]) != 2 or c["logprob"] > 0 for c in content):
            return f"chat logprobs: {content}"
    return _usage_ok(s.out, r.json()["usage"], MT)


def v_token_prompts(s: Soaker, refs: Refs) -> str:
    ids = s.rng.sample(TOKEN_PROMPTS, 2)
    r = s.call("POST", "/v1/completions", {"prompt": ids, "max_tokens": MT, "temperature": 0, "ignore_eos": True,
                                            "echo": s.rng.random() < 0.3})
    s.out.status, s.out.seqs = r.status_code, 2
    if r.status_code != 200:
        return r.text[:200]
    ch = r.json()["choices"]
    got = [c["text"][-len(refs.tokens[tuple(p)]):] if refs.tokens[tuple(p)] else c["text"] for c, p in zip(ch, ids,
                                                                                                            strict=True)]
    if got != [refs.tokens[tuple(p)] for p in ids]:
        return f"{ids}: {ch}"
    return _usage_ok(s.out, r.json()["usage"], 2 * MT)


def v_tokenize(s: Soaker, refs: Refs) -> str:
    p = s.rng.choice(PROMPTS)
    r = s.call("POST", "/tokenize", {"prompt": p, "add_special_tokens": False})
    s.out.status = r.status_code
    if r.status_code != 200:
        return r.text[:200]
    r = s.call("POST", "/detokenize", {"tokens": r.json()["tokens"]})
    s.out.status = r.status_code
    return "" if r.status_code == 200 and r.json()["prompt"] == p else f"round trip of {p!r}: {r.text[:200]}"


def v_json(s: Soaker, refs: Refs) -> str:
    """Structured output batched beside unconstrained requests: the answer is one of the schema's values."""
    values = ["yes", "no", "maybe"]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"enum": values}}}
    n = s.rng.choice([1, 2])
    chat = s.rng.random() < 0.5
    body: dict[str, Any] = {"max_tokens": 16, "n": n, "temperature": 1.0, "response_format": fmt}
    body.update({"messages": [{"role": "user", "content": s.rng.choice(PROMPTS)}]} if chat else
                {"prompt": s.rng.choice(PROMPTS)})
    r = s.call("POST", "/v1/chat/completions" if chat else "/v1/completions", body)
    s.out.status, s.out.seqs = r.status_code, n
    if r.status_code != 200:
        return r.text[:200]
    ch = r.json()["choices"]
    texts = [c["message"]["content"] if chat else c["text"] for c in ch]
    if len(ch) != n or any(t not in [json.dumps(v) for v in values] for t in texts):
        return f"not one of {values}: {ch}"
    if any(c["finish_reason"] != "stop" for c in ch):
        return f"constrained answer did not stop: {ch}"
    return _usage_ok(s.out, r.json()["usage"], None)


def v_models(s: Soaker, refs: Refs) -> str:
    r = s.call("GET", "/v1/models")
    s.out.status = r.status_code
    return "" if r.status_code == 200 and r.json()["data"][0]["id"] == MODEL else r.text[:200]


def hangup(s: Soaker, refs: Refs) -> str:
    """A client that reads the first event of a long stream and goes away: the request must be aborted."""
    p = f"{s.rng.choice(PROMPTS)} {s.rng.randrange(10**6)}"
    body = {"prompt": p, "max_tokens": HANGUP_TOKENS, "stream": True, "ignore_eos": True}
    with s.open_stream("/v1/completions", body) as r:
        s.out.status, s.out.hangup_prompt = r.status_code, p
        for _ in r.iter_lines():
            break
        return "" if r.status_code == 200 else f"hangup got {r.status_code}"


VALID: dict[str, tuple[float, Callable[[Soaker, Refs], str]]] = {
    "greedy": (8, v_greedy), "greedy-stream": (6, v_greedy_stream), "stop": (4, v_stop), "chat": (6, v_chat),
    "chat-stream": (5, v_chat_stream), "n": (5, v_n), "seed": (3, v_seed), "logprobs": (4, v_logprobs),
    "token-prompts": (4, v_token_prompts), "tokenize": (2, v_tokenize), "models": (1, v_models),
    "json": (3, v_json),
}


# -- bad requests: (weight, method, path, body, headers, status, what the error must name) ------------------------
def _chunks(n: int) -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
    yield b'{"prompt": "'
    for _ in range(n // 1024):
        yield b"z" * 1024
    yield b'"}'


USER = {"role": "user", "content": "hi"}
BAD: dict[str, tuple[float, str, str, Any, dict[str, str] | None, int, str]] = {
    "surrogate": (3, "POST", "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', None, 400,
                  "param=prompt|surrogate"),
    "surrogate-chat": (2, "POST", "/v1/chat/completions",
                       b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', None, 400, "surrogate"),
    "surrogate-stop": (1, "POST", "/v1/completions", b'{"prompt": "x", "stop": ["\\ud800"]}', None, 400, "param=stop"),
    "long-ids": (2, "POST", "/v1/completions", {"prompt": list(range(3, 300)), "max_tokens": 2}, None, 400,
                 "context"),
    "long-text": (2, "POST", "/v1/completions", {"prompt": "word " * 400, "max_tokens": 2}, None, 400,
                  "maximum context length"),
    "long-chat": (1, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]},
                  None, 400, "maximum context length"),
    "max-tokens": (2, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 10_000}, None, 400,
                   "maximum context length"),
    "bias-id": (2, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"99999": 5}}, None,
                400, "param=logit_bias|out of range"),
    "bias-key": (2, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"\u00b2": 1}}, None,
                 400, "param=logit_bias"),
    "bias-value": (1, "POST", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 1000}}, None, 400,
                   "logit_bias"),
    "unknown-field": (2, "POST", "/v1/completions", {"prompt": "x", "frobnicate": 1}, None, 400,
                      "unsupported field 'frobnicate'"),
    "unknown-chat-field": (1, "POST", "/v1/chat/completions", {"messages": [USER], "frobnicate_chat": 1},
                           None, 400, "unsupported field 'frobnicate_chat'"),
    "bad-json": (3, "POST", "/v1/completions", b'{"prompt": "x", ', None, 400, "invalid JSON"),
    "bad-utf8": (1, "POST", "/v1/completions", b'{"prompt": "caf\xe9"}', None, 400, "not UTF-8 (byte 0xe9"),
    "deep-json": (1, "POST", "/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, 400,
                  "nested too deeply"),
    "bad-type": (2, "POST", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, None, 400, "param=max_tokens"),
    "zero-tokens": (1, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, None, 400, "param=max_tokens"),
    "bad-role": (1, "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None, 400,
                 "role"),
    "huge-n": (2, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 100}, None, 400,
               "100 sequences"),
    "n-over-threads": (1, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 9, "temperature": 1},
                       None, 400, "9 sequences|n must be in"),
    "n-schema": (1, "POST", "/v1/completions", {"prompt": "x", "n": 1000}, None, 400, "param=n"),
    "many-prompts": (1, "POST", "/v1/completions", {"prompt": ["x"] * 600, "max_tokens": 1}, None, 400,
                     "--max-queue"),
    "host": (3, "GET", "/v1/models", None, {"Host": "evil.example:8000"}, 400, "code=host_not_allowed"),
    "host-post": (1, "POST", "/v1/completions", {"prompt": "x"}, {"Host": "localhost.evil.example"}, 400,
                  "DNS rebinding"),
    "no-key": (3, "POST", "/v1/completions", {"prompt": "x"}, {"Authorization": ""}, 401, "Missing API key"),
    "wrong-key": (2, "GET", "/metrics", None, {"Authorization": "Bearer nope"}, 401, "Incorrect API key"),
    "template-bomb": (2, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "SIZE-BOMB"}]},
                      None, 400, "chat template exceeded its output limit"),
    "template-bomb-tokenize": (1, "POST", "/tokenize", {"messages": [{"role": "user", "content": "SIZE-BOMB"}]},
                               None, 400, "chat template exceeded"),
    "body-too-big": (2, "POST", "/v1/completions", {"prompt": "y" * (MAX_BODY + 100)}, None, 413,
                     "code=request_too_large"),
    "body-chunked": (1, "POST", "/v1/completions", "chunked", None, 413, "exceeds"),
    "bad-model": (2, "POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, None, 404,
                  "code=model_not_found"),
    "wrong-method": (1, "GET", "/v1/completions", None, None, 405, "Method Not Allowed"),
    "no-route": (1, "POST", "/v1/nothing", {"prompt": "x"}, None, 404, "Not Found"),
    "detok-range": (1, "POST", "/detokenize", {"tokens": [5, 99999]}, None, 400, "out of range"),
    "tools": (1, "POST", "/v1/chat/completions", {"messages": [USER], "tools": [{"type": "function"}]}, None, 400,
              "tools"),
    "bad-schema": (1, "POST", "/v1/completions", {"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}}, None, 400,
        "param=response_format"),
    "echo-stream": (1, "POST", "/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1, "stream": True},
                    None, 400, "param=stream"),
}


def bad(s: Soaker, kind: str) -> str:
    _, method, path, body, headers, status, needle = BAD[kind]
    if body == "chunked":
        # A body larger than the limit without Content-Length: counted while it is read.
        r = s.c.post(path, content=_chunks(MAX_BODY + 2048), headers={"content-type": "application/json"})
        s.out.seen.append(r.status_code)
    elif isinstance(body, bytes):
        r = s.call(method, path, raw=body, headers=headers)
    else:
        r = s.call(method, path, body, headers=headers)
    s.out.status = r.status_code
    if r.status_code != status:
        return f"expected {status}: {r.status_code} {r.text[:200]}"
    try:
        err = r.json()["error"]
    except (ValueError, KeyError):
        return f"no error body: {r.text[:200]}"
    if set(err) != {"message", "type", "param", "code"} or not err["message"]:
        return f"not an OpenAI error body: {err}"
    named = any(
        (err[n[: n.index("=")]] == n[n.index("=") + 1:]) if re.fullmatch(r"(param|code)=\S+", n)
        else n.lower() in err["message"].lower() for n in needle.split("|"))
    return "" if named else f"the error does not name the problem ({needle}): {err}"


def one_request(clients: ClientPool, refs: Refs, i: int, kind: str) -> Outcome:
    rng = random.Random(i)
    out = Outcome(kind, kind in VALID)
    if time.time() > clients.deadline:
        out.problem = f"not sent: the soak's {BUDGET_S} s were up"
        return out
    s = Soaker(clients.get(), rng, out, clients.deadline)
    try:
        if kind == "hangup":
            out.problem = hangup(s, refs)
        elif kind == "loop-bomb":
            r = s.call("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "LOOP-BOMB"}]})
            out.status = r.status_code
            if r.status_code != 400 or "time limit" not in r.json()["error"]["message"]:
                out.problem = r.text[:200]
        elif kind in VALID:
            out.problem = VALID[kind][1](s, refs)
        else:
            out.problem = bad(s, kind)
    except Exception as e:  # a transport error or a malformed answer: reported with the others
        out.problem = f"{type(e).__name__}: {e}"[:300]
    return out


def plan(n: int, seed: int = 16) -> list[str]:
    """The soak's request kinds: weighted valid / bad / hangup, a few loop bombs spread out."""
    rng = random.Random(seed)
    kinds = {**{k: w for k, (w, _) in VALID.items()}, **{k: v[0] for k, v in BAD.items()}, "hangup": 3}
    names, weights = list(kinds), list(kinds.values())
    out = rng.choices(names, weights, k=n)
    for j in range(min(LOOP_BOMBS, n)):
        out[(j + 1) * n // (LOOP_BOMBS + 1)] = "loop-bomb"
    return out


def metric(text: str, name: str) -> float:
    """Sum of the samples of ``frugallm_<name>`` (all labels)."""
    pat = re.compile(rf"^frugallm_{name}(\{{[^}}]*\}})? (\S+)$")
    return sum(float(m.group(2)) for ln in text.splitlines() if (m := pat.match(ln)))


def statuses(text: str) -> Counter[int]:
    return Counter({int(m.group(1)): int(float(m.group(2)))
                    for m in re.finditer(r'^frugallm_http_responses_total\{status="(\d+)"\} (\S+)$', text, re.M)})


def test_soak_1000_mixed_requests(llm: LLM) -> None:
    import uvicorn

    refs = make_refs(llm)
    assert len(refs.stop) >= 4, refs  # enough prompts to test stop strings with
    saved = llm.tokenizer.chat_template
    llm.tokenizer.chat_template = HOSTILE + saved
    threads_before = set(threading.enumerate())
    engine = LLMEngine(llm, EngineConfig(num_blocks=256, block_size=4, max_num_seqs=MAX_NUM_SEQS))
    async_llm = AsyncLLM(engine, max_queue=MAX_QUEUE).start()
    app = create_app(async_llm, MODEL, api_key=KEY, max_body_bytes=MAX_BODY,
                     allowed_hosts=default_allowed_hosts("127.0.0.1"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    kinds = plan(N_REQUESTS)
    try:
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        clients = ClientPool(base)
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda ik: one_request(clients, refs, *ik), enumerate(kinds)))
        clients.close()
        elapsed = time.perf_counter() - t0
        key = {"Authorization": f"Bearer {KEY}"}
        deadline = time.time() + 20
        while engine.requests or async_llm.num_admitted:  # hung-up streams are aborted within the 0.5 s poll
            assert time.time() < deadline, f"still running: {list(engine.requests)}, {async_llm.num_admitted} admitted"
            time.sleep(0.05)
        health = httpx.get(f"{base}/health")
        text = httpx.get(f"{base}/metrics", headers=key).text
    finally:
        server.should_exit = True
        thread.join(30)
        async_llm.shutdown()
        llm.tokenizer.chat_template = saved

    failures = [(r.kind, r.status, r.problem) for r in results if r.problem]
    counts = Counter(r.kind for r in results)
    seen = Counter(st for r in results for st in r.seen)
    seen[health.status_code] += 1
    print(f"\nsoak: {N_REQUESTS} requests in {elapsed:.1f} s; statuses {dict(seen)}; kinds {dict(counts)}")
    assert not failures, f"{len(failures)} wrong answers: {failures[:10]}"
    # Every valid request answered (after its 429s), every bad one refused, nothing in a 5xx.
    assert all(r.status == 200 for r in results if r.valid or r.kind == "hangup")
    assert all(400 <= r.status < 500 for r in results if not r.valid and r.kind != "hangup")
    assert not [st for st in seen if st >= 500]
    assert seen[429] > 0, "the queue cap was never reached: the soak does not test it"
    assert health.status_code == 200

    # /metrics agrees with the clients: every response counted under its status (the /metrics read itself is not
    # counted yet when it is rendered), finished + aborted requests, prompt and generated tokens.
    server_statuses = statuses(text)
    assert server_statuses == seen, (server_statuses, seen)
    hangups = [r for r in results if r.kind == "hangup"]
    finished, aborted = metric(text, "request_success_total"), metric(text, "request_aborted_total")
    # A hung-up stream has ~200 steps to go when its client leaves: nearly all are aborted, not run to the end.
    assert len(hangups) // 2 <= aborted <= len(hangups), (aborted, len(hangups))
    valid_seqs = sum(r.seqs for r in results)
    assert finished + aborted == valid_seqs + len(hangups), (finished, aborted, valid_seqs)
    hangup_prompt_tokens = sum(len(llm.tokenizer.encode(r.hangup_prompt or "", add_special_tokens=True))
                               for r in hangups)
    assert metric(text, "prompt_tokens_total") == sum(r.prompt_tokens for r in results) + hangup_prompt_tokens
    generated = metric(text, "generation_tokens_total") - sum(r.completion_tokens for r in results)
    assert 0 <= generated <= HANGUP_TOKENS * len(hangups)
    assert 'status="5' not in text

    # Nothing left behind: KV blocks, admitted sequences, threads.
    assert engine.block_manager.num_used_blocks == 0 and metric(text, "kv_blocks_used") == 0
    engine.block_manager.check()
    assert async_llm.num_admitted == 0 and not engine.requests
    assert not thread.is_alive() and not async_llm._thread.is_alive()
    deadline = time.time() + 15
    while (left := [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]):
        assert time.time() < deadline, f"threads leaked: {left}"
        time.sleep(0.1)
    assert elapsed < 300  # a hang shows here, not as a CI timeout
