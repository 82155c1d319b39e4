"""Load generator for any OpenAI-compatible server (stdlib only: ``http.client`` + threads).

``run_load`` sends ``requests`` streaming ``/v1/completions`` requests, at most ``concurrency`` in flight,
and times each from its server-sent events: TTFT = first chunk with text, TPOT = (last token time -
first token time) / (tokens - 1). Output tokens come from the final ``usage`` chunk when the server
sends one (``stream_options.include_usage``), else one per text chunk. A refused connection, an HTTP
error or an error event makes that request's result an error, never an exception. A server started with an API
key (``frugallm serve --api-key``, plain or ``--ray``) gets ``api_key``, by default ``$FRUGALLM_API_KEY``.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from frugallm.errors import FrugalError


@dataclass(frozen=True)
class EndpointRequest:
    ok: bool
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    output_tokens: int
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, base path without trailing slash) of a server URL."""
    u = urlsplit(url if "://" in url else f"http://{url}")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise FrugalError(f"invalid endpoint URL {url!r}; expected http(s)://host:port")
    port = u.port or (443 if u.scheme == "https" else 80)
    path = u.path.rstrip("/")
    for suffix in ("/completions", "/v1"):
        path = path.removesuffix(suffix)
    return u.scheme, u.hostname, port, path


def _connect(scheme: str, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    return cls(host, port, timeout=timeout)


def _auth(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("FRUGALLM_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_model(url: str, timeout: float = 5.0, api_key: str | None = None) -> str | None:
    """The first model id from ``GET /v1/models``, or None when the server does not say."""
    scheme, host, port, base = _split(url)
    try:
        conn = _connect(scheme, host, port, timeout)
        conn.request("GET", f"{base}/v1/models", headers=_auth(api_key))
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200:
            return None
        data = json.loads(body).get("data") or []
        return str(data[0]["id"]) if data else None
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, AttributeError):
        return None


def _one(url: str, prompt: str, max_tokens: int, model: str, timeout: float,
         extra: dict[str, Any], api_key: str | None = None) -> EndpointRequest:
    scheme, host, port, base = _split(url)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    first = last = None
    chunks, usage_tokens = 0, None
    try:
        conn = _connect(scheme, host, port, timeout)
        conn.request("POST", f"{base}/v1/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream", **_auth(api_key)})
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read(500).decode("utf-8", "replace").strip()
            conn.close()
            return EndpointRequest(False, None, None, None, 0, f"HTTP {resp.status} {resp.reason}: {detail}")
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                conn.close()
                return EndpointRequest(False, None, None, None, chunks, f"server error event: {event['error']}")
            if event.get("usage") and event["usage"].get("completion_tokens") is not None:
                usage_tokens = int(event["usage"]["completion_tokens"])
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                last = time.perf_counter()
                first = first if first is not None else last
                chunks += 1
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        return EndpointRequest(False, None, None, None, chunks, f"cannot reach {url}: {e}")
    except ValueError as e:
        return EndpointRequest(False, None, None, None, chunks, f"malformed event from {url}: {e}")
    end = time.perf_counter()
    if first is None:
        return EndpointRequest(False, None, None, end - t0, 0, "the stream ended without any generated text")
    n = usage_tokens if usage_tokens else chunks
    tpot = (last - first) / (n - 1) if n > 1 else None
    return EndpointRequest(True, first - t0, tpot, end - t0, n)


def run_load(url: str, prompts: list[str], *, max_tokens: int, concurrency: int, requests: int,
             model: str | None = None, timeout: float = 120.0, ignore_eos: bool = True,
             api_key: str | None = None) -> tuple[list[EndpointRequest], float]:
    """Send ``requests`` requests (prompts cycled) with ``concurrency`` in flight; ``(results, wall_s)``."""
    if concurrency < 1 or requests < 1:
        raise FrugalError(f"endpoint: concurrency and requests must be >= 1, got {concurrency} and {requests}")
    if not prompts:
        raise FrugalError("endpoint: no prompts")
    _split(url)  # validate before starting threads
    model = model or served_model(url, api_key=api_key) or "default"
    extra = {"ignore_eos": True} if ignore_eos else {}  # vLLM/SGLang extension: exactly max_tokens tokens
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(_one, url, prompts[i % len(prompts)], max_tokens, model, timeout, extra, api_key)
                   for i in range(requests)]
        results = [f.result() for f in futures]
    return results, time.perf_counter() - t0
