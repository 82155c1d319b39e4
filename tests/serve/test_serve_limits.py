"""The server under untrusted work (issue 16 #5, #13): hostile chat templates, queue cap, large prompts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from frugallm import LLM
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.serve.app import create_app
from live_server import UvicornThread

pytestmark = pytest.mark.usefixtures("one_thread")

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


def make_engine(llm: LLM, **kw: Any) -> tuple[LLMEngine, AsyncLLM]:
    """A small paged engine on ``llm`` and its started :class:`AsyncLLM` (``kw``: its limits)."""
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8))
    return engine, AsyncLLM(engine, **kw).start()


def make_app(llm: LLM, **kw: Any) -> tuple[Any, LLMEngine, AsyncLLM]:
    engine, async_llm = make_engine(llm, **kw)
    return create_app(async_llm, "tiny", max_body_bytes=4 * 2**20), engine, async_llm


@pytest.fixture
def hostile_template(llm: LLM) -> Iterator[None]:
    saved = llm.tokenizer.chat_template
    yield
    llm.tokenizer.chat_template = saved


def health_latencies(url: str, busy: threading.Event) -> list[float]:
    """``/health`` round trips measured while ``busy`` is not set yet."""
    out = []
    with httpx.Client(base_url=url, timeout=10) as c:
        while not busy.is_set():
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            out.append(time.perf_counter() - t0)
            time.sleep(0.02)
    return out


def while_probing_health(url: str, send: Callable[[], httpx.Response]) -> tuple[httpx.Response, float, list[float]]:
    """``send()``'s response and how long it took, with the ``/health`` round trips measured meanwhile."""
    done = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        probe = pool.submit(health_latencies, url, done)
        time.sleep(0.1)
        t0 = time.perf_counter()
        r = send()
        elapsed = time.perf_counter() - t0
        done.set()
        return r, elapsed, probe.result()


@pytest.mark.parametrize("template", [NESTED_LOOPS, "{{ 'a' * 4000000000 }}"])
def test_hostile_chat_template_is_400_and_off_the_event_loop(llm: LLM, hostile_template: None,
                                                            template: str) -> None:
    llm.tokenizer.chat_template = template
    app, engine, _ = make_app(llm)
    with UvicornThread(app) as srv:
        r, elapsed, latencies = while_probing_health(srv.url, lambda: httpx.post(
            f"{srv.url}/v1/chat/completions", timeout=30,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        assert r.status_code == 400, r.text
        assert "chat template exceeded its" in r.json()["error"]["message"]
        assert elapsed < 10
        # The event loop kept answering while the template ran (2 s for the loops).
        assert latencies and max(latencies) < 0.5, latencies
        assert httpx.get(f"{srv.url}/health").status_code == 200
    assert engine.block_manager.num_used_blocks == 0


# -- queue cap (issue 16 #13) -------------------------------------------------------------------------------
def test_huge_request_is_rejected_up_front(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    app, engine, async_llm = make_app(llm)  # the default cap
    calls = []
    monkeypatch.setattr(type(async_llm.inputs), "encode", lambda self, p: calls.append(p) or [1])
    with TestClient(app) as c:
        t0 = time.perf_counter()
        r = c.post("/v1/completions", json={"prompt": ["hello"] * 20_000, "max_tokens": 4})
        elapsed = time.perf_counter() - t0
    assert r.status_code == 400, r.text
    assert "20000 sequences" in r.json()["error"]["message"] and "--max-queue" in r.json()["error"]["message"]
    assert not calls and elapsed < 2  # nothing was tokenized
    assert async_llm.num_admitted == 0 and engine.block_manager.num_used_blocks == 0


def test_full_queue_is_429_with_retry_after(llm: LLM) -> None:
    app, engine, async_llm = make_app(llm, max_queue=4)
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # slow the tiny model down: ~0.5 s per request
    slow = {"prompt": "x", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    with UvicornThread(app) as srv, ThreadPoolExecutor(4) as pool:
        running = [pool.submit(httpx.post, f"{srv.url}/v1/completions", json={**slow, "n": 2}, timeout=60)
                   for _ in range(2)]  # 2 x n=2: the cap of 4 sequences
        deadline = time.time() + 10
        while async_llm.num_admitted < 4:
            assert time.time() < deadline
            time.sleep(0.01)
        for body in ({"prompt": "y", "max_tokens": 2}, {"prompt": "y", "max_tokens": 2, "stream": True}):
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=10)
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        chat = httpx.post(f"{srv.url}/v1/chat/completions", timeout=10,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 429
        assert all(f.result().status_code == 200 for f in running)  # the admitted work was not disturbed
        assert async_llm.num_admitted == 0
        assert httpx.post(f"{srv.url}/v1/completions", json={"prompt": "y", "max_tokens": 2}).status_code == 200
        metrics = httpx.get(f"{srv.url}/metrics").text
    assert 'status="429"} 3' in metrics
    assert engine.block_manager.num_used_blocks == 0


def test_admission_is_released_however_a_stream_ends(llm: LLM) -> None:
    import asyncio

    from frugallm import SamplingParams

    engine, async_llm = make_engine(llm, max_queue=3)
    req = async_llm.inputs.process("x", SamplingParams(max_tokens=30, ignore_eos=True), n=3)

    async def scenario() -> None:
        unread = async_llm.generate_many([req])  # admitted now, dropped unread
        assert async_llm.num_admitted == 3
        del unread
        assert async_llm.num_admitted == 0
        stream = async_llm.generate_many([req])
        await stream.__anext__()
        await stream.aclose()  # a client gone mid-stream
        assert async_llm.num_admitted == 0
        async for _ in async_llm.generate_many([req]):
            pass
        assert async_llm.num_admitted == 0

    try:
        asyncio.run(scenario())
        deadline = time.time() + 10
        while engine.requests and time.time() < deadline:
            time.sleep(0.01)
        assert engine.block_manager.num_used_blocks == 0
    finally:
        async_llm.shutdown()


def test_chat_default_max_tokens_is_bounded(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from frugallm.serve import openai

    monkeypatch.setattr(openai, "CHAT_DEFAULT_MAX_TOKENS", 5)  # the tiny model's context is shorter than 4096
    app, _, _ = make_app(llm)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_large_prompt_is_tokenized_off_the_event_loop(llm: LLM) -> None:
    app, engine, _ = make_app(llm)
    prompt = ("The quick brown fox jumps over the lazy dog. " * 45_000)[:2_000_000]  # 2 MB
    with UvicornThread(app) as srv:
        r, elapsed, latencies = while_probing_health(srv.url, lambda: httpx.post(
            f"{srv.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60))
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"], r.text[:300]
    assert elapsed > 0.2 and len(latencies) >= 3  # /health was asked while the prompt was being tokenized
    assert max(latencies) < 0.5, latencies
    assert engine.block_manager.num_used_blocks == 0


def test_tokenizer_never_runs_on_the_event_loop(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16 #13 without timing: the latency test above cannot tell a fast tokenizer blocking the loop from one
    off it (it passed on the code that tokenized completions on the loop), and /tokenize still encoded there. Every
    route's encode, decode and template render is recorded with whether it ran on the event loop's thread."""
    import asyncio

    from fastapi.testclient import TestClient

    from frugallm.tokenizer.tokenizer import Tokenizer

    on_loop: list[str] = []

    def spy(name: str) -> Any:
        real = getattr(Tokenizer, name)

        def wrapped(self: Tokenizer, *a: Any, **k: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop.append(name)
            except RuntimeError:  # a worker thread: no loop runs here
                pass
            return real(self, *a, **k)

        return wrapped

    for name in ("encode", "decode", "apply_chat_template"):
        monkeypatch.setattr(Tokenizer, name, spy(name))
    app, engine, _ = make_app(llm)
    chat = [{"role": "user", "content": "hi"}]
    with TestClient(app) as c:
        for path, body in [("/v1/completions", {"prompt": "hello", "max_tokens": 2}),
                           ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "stream": True}),
                           ("/v1/chat/completions", {"messages": chat, "max_tokens": 2}),
                           ("/tokenize", {"prompt": "hello", "return_token_strs": True}),
                           ("/tokenize", {"messages": chat}), ("/detokenize", {"tokens": [5, 6, 7]})]:
            r = c.post(path, json=body)
            assert r.status_code == 200, (path, r.text)
            assert not on_loop, (path, on_loop)
    assert engine.block_manager.num_used_blocks == 0


def test_admission_is_released_when_the_engine_is_done_not_when_the_stream_is_collected(llm: LLM) -> None:
    import asyncio

    from frugallm import SamplingParams

    engine, async_llm = make_engine(llm, max_queue=3)
    req = async_llm.inputs.process("x", SamplingParams(max_tokens=6, ignore_eos=True), n=3)

    async def scenario() -> None:
        # A client that hung up between two reads: the stream stays suspended, never closed, still referenced
        # (as a response object in a reference cycle is until the garbage collector runs).
        stream = async_llm.generate_many([req])
        await stream.__anext__()
        deadline = time.time() + 10
        while async_llm.num_admitted:
            assert time.time() < deadline, f"{async_llm.num_admitted} still admitted after the engine finished"
            await asyncio.sleep(0.02)
        assert not engine.requests
        del stream

    try:
        asyncio.run(scenario())
    finally:
        async_llm.shutdown()
