"""The pieces of the Ray Serve deployment that need no Ray: an ASGI app called with one buffered request, the
routing key read from a request body, and per-replica Prometheus texts merged under a ``replica`` label.

``ray_app.py`` runs the app :func:`frugallm.serve.app.create_app` builds inside every engine replica and reaches it
through :func:`call_asgi` (the ingress forwards the request's scope and body, the replica streams the ASGI
messages back), so the OpenAI routes, their validation and their errors are the plain server's, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

# The scope keys a forwarded request keeps: plain values that pickle (no app, router or state objects).
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
              "headers", "client", "server")
REPLICA_HEADER = "x-frugallm-replica"  # which replica answered (the routing tests and debugging read it)


def portable_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """The picklable part of an HTTP ``scope`` (headers as a list of byte pairs)."""
    out = {k: scope[k] for k in SCOPE_KEYS if k in scope}
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", ())]
    out["root_path"] = ""
    return out


async def call_asgi(app: Any, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
    """Run ``app`` on one request whose body is ``body``; yield the ASGI messages it sends, up to the last body
    message. Closing the iterator early (the client went away) tells the app the client disconnected (a
    generating request is aborted, freeing its KV blocks) and cancels it."""
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    def finished(task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: Starlette re-raises after answering 500, the answer is what counts
        messages.put_nowait(None)

    task = asyncio.ensure_future(app(dict(scope), receive, send))
    task.add_done_callback(finished)
    try:
        while (message := await messages.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                break
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@dataclass(frozen=True)
class RouteKey:
    """What the request router sees of a request. ``prompt`` is the text prefix-affinity routing matches
    (Ray's ``PrefixCacheAffinityRouter`` reads a ``prompt`` attribute): the prompt or the chat messages, after the
    adapter's name for a request to an adapter (a prefix under one adapter is no use to another); '' for requests
    without one (``/v1/models``, ``/tokenize`` of nothing, ...), which go to the less loaded of two replicas.
    ``model`` is the request's ``model`` field ('' when absent)."""

    model: str
    prompt: str


def route_key(body: bytes, base_model: str) -> RouteKey:
    """The :class:`RouteKey` of a request with JSON ``body`` on a server whose base model is named ``base_model``
    (a body that does not parse has no prompt: the replica answers it with the plain server's 400)."""
    try:
        data = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    model = data.get("model") if isinstance(data.get("model"), str) else ""
    text = _text(data.get("messages")) if "messages" in data else _text(data.get("prompt"))
    return RouteKey(model, f"{model}\n{text}" if text and model and model != base_model else text)


def _text(value: Any) -> str:
    """A prompt (string, token ids, a batch: its first prompt) or chat messages as one string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return " ".join(map(str, value))
        if isinstance(value[0], dict):  # chat messages
            return "".join(f"{m.get('role', '')}: {_content(m.get('content'))}\n" for m in value
                           if isinstance(m, dict))
        return _text(value[0])
    return ""


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?(\s.*)$")


def _family(name: str, families: dict[str, list[str]]) -> str:
    """The family a sample line belongs to (histograms' ``_bucket`` / ``_sum`` / ``_count``)."""
    for suffix in ("", "_bucket", "_sum", "_count"):
        if suffix and name.endswith(suffix) and name[: -len(suffix)] in families:
            return name[: -len(suffix)]
    return name


def merge_metrics(texts: Iterable[tuple[str, str]]) -> str:
    """Prometheus texts of several replicas, ``(replica, text)``, as one text: each family's ``# HELP`` and
    ``# TYPE`` once, then every replica's samples with a ``replica`` label added (a family's samples must stay
    together for a scraper)."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in texts:
        label = f'replica="{replica}"'
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                heads.setdefault(name, [])
                if line not in heads[name]:
                    heads[name].append(line)
                samples.setdefault(name, [])
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            name, labels, rest = m.groups()
            labels = f"{{{label},{labels[1:]}" if labels and labels != "{}" else f"{{{label}}}"
            samples.setdefault(_family(name, samples), []).append(f"{name}{labels}{rest}")
    out: list[str] = []
    for name, lines in samples.items():
        out += heads.get(name, [])
        out += lines
    return "\n".join(out) + "\n"
