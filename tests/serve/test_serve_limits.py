"""The server under untrusted work (issue 16 #5, #13): hostile chat templates, queue cap, large prompts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from frugallm import LLM
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


def make_app(llm: LLM, **kw: Any) -> tuple[Any, LLMEngine, AsyncLLM]:
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8))
    async_llm = AsyncLLM(engine, **kw).start()
    return create_app(async_llm, "tiny", max_body_bytes=4 * 2**20), engine, async_llm


class LiveServer:
    """uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


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


@pytest.mark.parametrize("template", [NESTED_LOOPS, "{{ 'a' * 4000000000 }}"])
def test_hostile_chat_template_is_400_and_off_the_event_loop(llm: LLM, hostile_template: None,
                                                            template: str) -> None:
    llm.tokenizer.chat_template = template
    app, engine, _ = make_app(llm)
    with LiveServer(app) as srv:
        done = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            probe = pool.submit(health_latencies, srv.url, done)
            time.sleep(0.1)
            t0 = time.perf_counter()
            r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            elapsed = time.perf_counter() - t0
            done.set()
            latencies = probe.result()
        assert r.status_code == 400, r.text
        assert "chat template exceeded its" in r.json()["error"]["message"]
        assert elapsed < 10
        # The event loop kept answering while the template ran (2 s for the loops).
        assert latencies and max(latencies) < 0.5, latencies
        assert httpx.get(f"{srv.url}/health").status_code == 200
    assert engine.block_manager.num_used_blocks == 0
