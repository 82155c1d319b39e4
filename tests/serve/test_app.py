"""The OpenAI-compatible server on a tiny random model: routes, formats, bad input, auth, disconnects (the
1,000-request soak: test_soak.py; schema fuzzing: test_openapi_fuzz.py; the serve command: test_serve_command.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from frugallm import LLM, SamplingParams
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.serve.app import create_app
from live_server import UvicornThread

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny"


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


def make_app(llm: LLM, api_key: str | None = None, max_body_bytes: int = 2**20,
             allowed_hosts: list[str] | None = None, **cfg: Any):
    cfg = {"num_blocks": 128, "block_size": 4, "max_num_seqs": 8, **cfg}
    engine = LLMEngine(llm, EngineConfig(**cfg))
    return create_app(AsyncLLM(engine).start(), MODEL, api_key=api_key, max_body_bytes=max_body_bytes,
                      allowed_hosts=allowed_hosts), engine


@pytest.fixture(scope="module")
def client(llm: LLM) -> Iterator[TestClient]:
    app, _ = make_app(llm)
    with TestClient(app) as c:
        yield c


def greedy(llm: LLM, prompt: Any, max_tokens: int) -> Any:
    return llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]


def sse_events(lines: Iterator[str]) -> list[Any]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- routes and formats ---------------------------------------------------------------------------------
def test_models_health_metrics(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").json() == {"status": "ok"}
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "num_requests_running",
                 "num_requests_waiting", "kv_blocks_used", "kv_blocks_free", "generation_tokens_total"):
        assert f"frugallm_{name}" in m.text


def test_completion_matches_generate(client: TestClient, llm: LLM) -> None:
    ref = greedy(llm, "The cat sat on", 10)
    body = {"model": MODEL, "prompt": "The cat sat on", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "text_completion" and j["model"] == MODEL
    assert j["choices"][0]["text"] == ref.text and j["choices"][0]["finish_reason"] == "length"
    n_prompt = len(ref.prompt_token_ids)
    cached = j["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert j["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 10, "total_tokens": n_prompt + 10,
                          "prompt_tokens_details": {"cached_tokens": cached}}
    # Streaming gives the same text, in pieces, then the usage chunk and [DONE].
    with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)


def test_token_prompts_batches_and_n(client: TestClient, llm: LLM) -> None:
    ids = [[5, 6, 7, 8], [40, 41]]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0, "n": 2,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for i, p in enumerate(ids):
        ref = greedy(llm, p, 4).text
        assert choices[2 * i]["text"] == choices[2 * i + 1]["text"] == ref
    assert r.json()["usage"]["prompt_tokens"] == 6 and r.json()["usage"]["completion_tokens"] == 16


def test_chat_matches_generate(client: TestClient, llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    ref = greedy(llm, llm.chat_prompt(messages), 8)
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    j = client.post("/v1/chat/completions", json=body).json()
    assert j["object"] == "chat.completion"
    assert j["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == ref.text
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    # Content as a list of text parts is the same conversation.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo!"}]}]
    j2 = client.post("/v1/chat/completions", json={**body, "messages": [messages[0], *parts]}).json()
    assert j2["choices"][0]["message"]["content"] == ref.text


def test_logprobs_formats(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "temperature": 0, "logprobs": 2,
                                             "ignore_eos": True}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"])  # keyed by text: distinct ids may decode alike
    assert all(lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values()) for i in range(3))  # greedy
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                  "logprobs": True, "top_logprobs": 3, "ignore_eos": True}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 for c in content)
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}


def test_seed_and_stop(client: TestClient) -> None:
    body = {"prompt": "hello", "max_tokens": 12, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    a = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b
    text = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    stop = text[3:5]
    j = client.post("/v1/completions", json={**body, "temperature": 0, "stop": [stop]}).json()
    assert j["choices"][0]["text"] == text[:text.find(stop)] and j["choices"][0]["finish_reason"] == "stop"


# -- bad input --------------------------------------------------------------------------------------------
BAD = [
    ("completions", b"{not json", 400, None),
    ("completions", b'["a list"]', 400, None),
    ("completions", b'{"max_tokens": 4}', 400, "prompt"),
    ("completions", b'{"prompt": 5}', 400, "prompt"),
    ("completions", b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("completions", b'{"prompt": "x", "max_tokens": -3}', 400, "max_tokens"),
    ("completions", b'{"prompt": "x", "max_tokens": 100000}', 400, None),
    ("completions", b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    ("completions", b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
    ("completions", b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ("completions", b'{"prompt": "x", "n": 0}', 400, "n"),
    ("completions", b'{"prompt": "x", "n": 100}', 400, None),
    ("completions", b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
    ("completions", b'{"prompt": "x", "seed": 1e400}', 400, "seed"),
    ("completions", b'{"prompt": "x", "logprobs": 50}', 400, "logprobs"),
    ("completions", b'{"prompt": "x", "stop": [1, 2]}', 400, None),
    ("completions", b'{"prompt": ""}', 400, None),
    ("completions", b'{"prompt": []}', 400, None),
    ("completions", b'{"prompt": [99999999]}', 400, None),
    ("completions", b'{"prompt": [-1]}', 400, None),
    ("completions", b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
    ("completions", json.dumps({"prompt": list(range(3, 300))}).encode(), 400, None),  # longer than the context
    ("completions", b'{"prompt": "x", "logit_bias": {"99999": 1}}', 400, "logit_bias"),
    ("completions", b'{"prompt": "x", "logit_bias": {"five": 1}}', 400, "logit_bias"),
    ("completions", '{"prompt": "x", "logit_bias": {"\u00b2": 1}}'.encode(), 400, "logit_bias"),  # was a 500
    ("completions", b'{"prompt": "x", "logit_bias": {"5": 101}}', 400, None),
    ("completions", b'{"prompt": "x", "stop_token_ids": [99999]}', 400, "stop_token_ids"),
    ("completions", b'{"prompt": "x", "min_tokens": 20}', 400, None),  # more than max_tokens (16)
    ("completions", b'{"prompt": "x", "min_tokens": -1}', 400, "min_tokens"),
    ("completions", b'{"prompt": "x", "echo": true, "logprobs": 1, "n": 2}', 400, "n"),
    ("completions", b'{"prompt": "x", "echo": true, "logprobs": 1, "stream": true}', 400, "stream"),
    ("completions", b'{"prompt": "x", "echo": true, "max_tokens": 0, "stream": true}', 400, "stream"),
    ("completions", b'{"prompt": "x", "frobnicate": 1}', 400, None),
    ("completions", b'{"prompt": "x", "use_beam_search": true}', 400, None),
    ("chat/completions", b'{"messages": []}', 400, "messages"),
    ("chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, None),
    ("chat/completions", b'{"messages": [{"role": "user", "content": 7}]}', 400, None),
    ("chat/completions", b'{"messages": "hello"}', 400, "messages"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400, None),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
     400, None),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}', 400,
     "max_completion_tokens"),
    # lone surrogates: valid JSON, not encodable as UTF-8 (was a 500 TypeError from the tokenizer)
    ("completions", b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("completions", b'{"prompt": ["ok", "a\\udfffb"]}', 400, "prompt"),
    ("completions", b'{"prompt": "x", "stop": "\\ud800"}', 400, "stop"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages.0.content"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc80"}]}]}',
     400, None),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD, ids=[f"{r}:{b[:40]!r}" for r, b, _, _ in BAD])
def test_bad_input_is_4xx_with_openai_error(client: TestClient, route: str, body: bytes, status: int,
                                            param: str | None) -> None:
    r = client.post(f"/v1/{route}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_unknown_route_and_method(client: TestClient) -> None:
    assert client.get("/v1/nothing").status_code == 404
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_oversized_body_is_413(llm: LLM) -> None:
    app, _ = make_app(llm, max_body_bytes=1000)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 2000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_api_key(llm: LLM) -> None:
    app, _ = make_app(llm, api_key="sesame")
    with TestClient(app) as c:
        body = {"prompt": "x", "max_tokens": 1}
        assert c.post("/v1/completions", json=body).status_code == 401
        r = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # Checked before the body is parsed: bad JSON without a key is still 401.
        assert c.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert c.get("/health").status_code == 200
        # issue 16 #12: everything but /health needs the key (/metrics leaked request and token counts)
        for path in ("/metrics", "/docs", "/openapi.json", "/redoc", "/nothing"):
            assert c.get(path).status_code == 401, path
        ok = {"Authorization": "Bearer sesame"}
        assert 'frugallm_http_responses_total{status="401"}' in c.get("/metrics", headers=ok).text
        assert c.get("/openapi.json", headers=ok).json()["info"]["title"] == "frugallm"


def test_host_header_guard(llm: LLM) -> None:
    # issue 16 #12: a page whose DNS name is rebound to 127.0.0.1 must not reach a loopback server
    from frugallm.serve.app import default_allowed_hosts

    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("10.1.2.3") is None
    hosts = default_allowed_hosts("127.0.0.2")
    assert hosts is not None and {"localhost", "127.0.0.1", "[::1]", "127.0.0.2"} <= set(hosts)
    assert "[::1]" in (default_allowed_hosts("::1") or [])
    app, _ = make_app(llm, allowed_hosts=[*hosts, "my.box"])
    with TestClient(app) as c:
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "127.0.0.2:80", "My.Box"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"):
            r = c.get("/v1/models", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", host
    app, _ = make_app(llm, allowed_hosts=["*"])
    with TestClient(app) as c:
        assert c.get("/health", headers={"Host": "anything.example"}).status_code == 200


def test_server_errors_are_counted(llm: LLM) -> None:
    # issue 16 #1: 500s are sent by Starlette's ServerErrorMiddleware, outside the status-counting guard
    app, _ = make_app(llm)

    async def boom() -> None:
        raise RuntimeError("boom")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        for _ in range(3):
            r = c.get("/boom")
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert c.get("/health").status_code == 200
        text = c.get("/metrics").text
    assert 'frugallm_http_responses_total{status="500"} 3' in text, text[-600:]


# -- a real server: disconnects ------------------------------------------------------------------------------
def kv_used(base: str, headers: dict[str, str] | None = None) -> float:
    text = httpx.get(f"{base}/metrics", headers=headers).text
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("frugallm_kv_blocks_used ")))


def wait_idle(base: str, engine: LLMEngine, timeout: float = 20, headers: dict[str, str] | None = None) -> None:
    deadline = time.time() + timeout
    while (engine.requests or kv_used(base, headers)) and time.time() < deadline:
        time.sleep(0.05)


def test_client_disconnect_frees_blocks(llm: LLM) -> None:
    app, engine = make_app(llm)
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # slow the tiny model down: >= 2 s for 200 tokens
    with UvicornThread(app) as srv:
        body = {"prompt": "x", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        break  # the first token arrived; hang up
            assert engine.block_manager.num_used_blocks > 0 or engine.requests  # still generating then
        # Non-streaming: give up before the answer.
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=srv.url, timeout=0.3) as c:
            c.post("/v1/completions", json=body)
        time.sleep(1.0)  # the server notices the closed connection within its 0.5 s poll
        wait_idle(srv.url, engine)
        assert kv_used(srv.url) == 0 and not engine.requests
        assert 'frugallm_request_aborted_total 2' in httpx.get(f"{srv.url}/metrics").text
