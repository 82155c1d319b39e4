"""The Ray deployment's Ray-free parts: the app called with one buffered request (answers, streams, disconnects),
routing keys from request bodies, and per-replica metrics merged under a ``replica`` label."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from frugallm.serve.relay import call_asgi, merge_metrics, portable_scope, route_key


def _scope(path: str, method: str = "POST") -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": object()}


def test_call_asgi_answers_streams_and_tells_the_app_of_a_disconnect() -> None:
    app = FastAPI()
    closed: list[str] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"got": (await request.json())["x"]}

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        async def ticks():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.001)
            finally:
                closed.append("stream closed")

        return StreamingResponse(ticks(), media_type="text/event-stream")

    async def run() -> None:
        messages = [m async for m in call_asgi(app, portable_scope(_scope("/echo")), b'{"x": 7}')]
        assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
        assert json.loads(b"".join(m.get("body", b"") for m in messages[1:])) == {"got": 7}
        bad = [m async for m in call_asgi(app, _scope("/nope"), b"")]
        assert bad[0]["status"] == 404
        gen = call_asgi(app, _scope("/stream"), b"")
        got = []
        async for m in gen:
            got.append(m)
            if len(got) == 4:
                break
        await gen.aclose()  # the client went away after 3 events
        await asyncio.sleep(0.05)
        assert got[1]["body"] == b"data: 0\n\n" and closed == ["stream closed"]

    asyncio.run(run())


def test_portable_scope_keeps_plain_values_only() -> None:
    scope = portable_scope(_scope("/v1/completions"))
    assert "app" not in scope and scope["path"] == "/v1/completions" and scope["headers"][0] == (b"host", b"localhost")


def test_route_key_reads_model_and_prompt() -> None:
    key = route_key(json.dumps({"model": "base", "prompt": "hello there"}).encode(), "base")
    assert (key.model, key.prompt) == ("base", "hello there")
    key = route_key(json.dumps({"model": "sql", "prompt": [5, 17, 30]}).encode(), "base")
    assert (key.model, key.prompt) == ("sql", "sql\n5 17 30")  # an adapter's prefixes are its own
    chat = {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert route_key(json.dumps(chat).encode(), "base").prompt == "user: hi\n"
    assert route_key(json.dumps({"prompt": ["first", "second"]}).encode(), "base").prompt == "first"
    assert route_key(b"{not json", "base") == route_key(b"", "base") == route_key(b"[1]", "base")
    assert route_key(json.dumps({"model": "sql"}).encode(), "base").prompt == ""  # no prompt: routed by load


def test_merge_metrics_labels_each_replica_and_keeps_families_together() -> None:
    a = ("# HELP frugallm_x_total X.\n# TYPE frugallm_x_total counter\nfrugallm_x_total 3\n"
         "# HELP frugallm_h H.\n# TYPE frugallm_h histogram\nfrugallm_h_bucket{le=\"0.1\"} 1\n"
         "frugallm_h_sum 0.05\nfrugallm_h_count 1\n")
    b = a.replace(" 3\n", " 4\n")
    text = merge_metrics([("r1", a), ("r2", b)])
    lines = text.splitlines()
    assert lines.count("# TYPE frugallm_x_total counter") == 1
    assert lines[2:4] == ['frugallm_x_total{replica="r1"} 3', 'frugallm_x_total{replica="r2"} 4']
    assert 'frugallm_h_bucket{replica="r2",le="0.1"} 1' in lines
    h = lines.index("# TYPE frugallm_h histogram")
    assert all(line.startswith("frugallm_h_") for line in lines[h + 1:])  # no other family in between
