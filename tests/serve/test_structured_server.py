"""``response_format`` through the ``openai`` client against a live server (tiny random model): json_object and
json_schema, streamed and not, ``n > 1``; a schema the library rejects is a 400 before the engine sees anything;
no KV block stays in use."""

from __future__ import annotations

import json

import pytest

from frugallm import LLM
from live_server import LiveServer
from structured_schemas import THING as SCHEMA

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pytestmark = pytest.mark.usefixtures("one_thread")

FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
CHAT = [{"role": "user", "content": "Describe a thing as JSON"}]


@pytest.fixture(scope="module")
def server(tiny_models):
    llm = LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")
    with LiveServer(llm, "tiny", num_blocks=128, block_size=4, max_num_seqs=4) as srv:
        yield srv


def streamed(stream) -> dict[int, tuple[str, str | None]]:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for chunk in stream:
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            texts[c.index] = texts.get(c.index, "") + (piece or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return {i: (texts[i], finish[i]) for i in texts}


def test_json_schema_chat_and_completions(server) -> None:
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=CHAT, response_format=FORMAT, max_tokens=80,
                                       temperature=0.9, seed=1, n=2)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    got = streamed(client.chat.completions.create(model="tiny", messages=CHAT, response_format=FORMAT,
                                                  max_tokens=80, temperature=0, stream=True))
    ref = client.chat.completions.create(model="tiny", messages=CHAT, response_format=FORMAT, max_tokens=80,
                                         temperature=0)
    assert got == {0: (ref.choices[0].message.content, "stop")}
    jsonschema.validate(json.loads(got[0][0]), SCHEMA)
    # /v1/completions takes response_format too (vLLM's extension)
    c = client.completions.create(model="tiny", prompt="JSON:", max_tokens=80, temperature=0,
                                  extra_body={"response_format": FORMAT})
    jsonschema.validate(json.loads(c.choices[0].text), SCHEMA)
    got = streamed(client.completions.create(model="tiny", prompt="JSON:", max_tokens=80, temperature=0,
                                             stream=True, extra_body={"response_format": FORMAT}))
    assert got == {0: (c.choices[0].text, "stop")}
    assert server.engine.block_manager.num_used_blocks == 0


def test_json_object(server) -> None:
    client = server.client()
    for stream in (False, True):
        kw = {"model": "tiny", "messages": CHAT, "response_format": {"type": "json_object"}, "max_tokens": 60,
              "temperature": 0.8, "seed": 5}
        if stream:
            text, finish = streamed(client.chat.completions.create(stream=True, **kw))[0]
        else:
            choice = client.chat.completions.create(**kw).choices[0]
            text, finish = choice.message.content, choice.finish_reason
        assert text.startswith("{")
        if finish == "stop":  # a random model may not close its object within max_tokens
            assert isinstance(json.loads(text), dict)
    r = client.chat.completions.create(model="tiny", messages=CHAT, response_format={"type": "text"}, max_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert server.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize(("fmt", "needle"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "nonsense"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "nowhere"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}}, "regex"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ({"type": "yaml"}, "type"),
])
def test_bad_schema_is_a_400_before_the_engine(server, fmt: dict, needle: str) -> None:
    client = server.client()
    before = server.engine.metrics.prompt_tokens.values[""]
    for endpoint in ("chat", "completions"):
        with pytest.raises(openai.BadRequestError) as e:
            if endpoint == "chat":
                client.chat.completions.create(model="tiny", messages=CHAT, response_format=fmt, max_tokens=5)
            else:
                client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body={"response_format": fmt})
        body = e.value.body
        assert needle in body["message"] and "response_format" in (body["param"] or "") + body["message"]
    assert server.engine.metrics.prompt_tokens.values[""] == before  # nothing reached the engine
    assert server.engine.block_manager.num_used_blocks == 0
