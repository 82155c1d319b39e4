"""A 1,000-request soak of a live server (issue 16, "Done when"): valid work mixed with bad input of every kind the
issue lists, from 16 concurrent clients, against a queue cap small enough that 429s are routine.

Every valid request must end in a 200 with a complete answer (greedy ones equal to the offline ``LLM.generate``
text; a 429 is retried as a client would, after checking its ``Retry-After``); every bad one in the expected 4xx
with an OpenAI error body naming the problem; nothing in a 5xx. At the end ``/metrics`` agrees with what the
clients saw (status counts, finished / aborted requests, prompt and generated tokens), no KV block or admitted
sequence is left, and no thread outlives the server. ``FRUGALLM_SOAK_REQUESTS`` changes the count.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from frugallm import LLM
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.serve.app import create_app, default_allowed_hosts
from soak_client import HANGUP_TOKENS, KEY, MAX_BODY, MODEL, ClientPool, make_refs
from soak_kinds import HOSTILE, one_request, plan

pytestmark = pytest.mark.usefixtures("one_thread")

N_REQUESTS = int(os.environ.get("FRUGALLM_SOAK_REQUESTS", "1000"))
CLIENTS = 16
MAX_QUEUE = 8  # sequences: 16 clients sending n <= 3 pass it all the time
MAX_NUM_SEQS = 8


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


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
