"""``tools`` / ``tool_choice`` on /v1/chat/completions through the ``openai`` client: a tiny random model given a
Qwen2.5-style template (built here) for the API surface, and Qwen2.5-Coder-0.5B (when its file is present) for a
real round trip: call -> tool result -> answer, streamed and not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frugallm import LLM
from live_server import LiveServer

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pytestmark = pytest.mark.usefixtures("one_thread")

# Qwen2.5's template, shortened (its tool system prompt, calls and tool responses as the real one writes them).
QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}"
    "{{- tool | tojson }}{%- endfor %}{{- '\\n</tools>\\nReturn calls as <tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' or (message.role == 'assistant' and not "
    "message.tool_calls) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + "
    "'\\n</tool_response><|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_models):
    # A byte-level 384-token vocabulary spells tool definitions in ~3 characters a token: a longer context.
    llm = LLM(str(tiny_models.hf("llama", max_position_embeddings=2048)), dtype="float32", device="cpu")
    llm.tokenizer.chat_template = QWEN_TEMPLATE
    with LiveServer(llm, "tiny", num_blocks=256, block_size=4, max_num_seqs=4) as srv:
        yield srv


def check_calls(calls, names: list[str]) -> None:
    assert calls and all(c.type == "function" and c.id.startswith("chatcmpl-tool-") for c in calls)
    for c in calls:
        assert c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def collect_stream(stream) -> tuple[str, list[dict], str | None]:
    """Content, the tool calls assembled from their deltas (OpenAI's accumulation rule), the finish reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                cur = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                cur["name"] += tc.function.name or ""
                cur["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_required_and_named(server) -> None:
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=200, temperature=0.8, seed=3, n=2)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls, ["get_weather", "get_time"])
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=200,
                                       temperature=0)
    (call,) = r.choices[0].message.tool_calls
    check_calls([call], ["get_time"])
    content, calls, finish = collect_stream(client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=200, temperature=0, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)]
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=200, temperature=0.9, seed=4)
    assert len(r.choices[0].message.tool_calls) == 1
    assert server.engine.block_manager.num_used_blocks == 0


def test_auto_and_none_render_tools_or_not(server) -> None:
    client = server.client()
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, temperature=0)
    auto = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=4, temperature=0)
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4,
                                          temperature=0)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens == none.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert auto.choices[0].message.tool_calls is None  # a random model writes no <tool_call>: plain content
    content, calls, _ = collect_stream(client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, max_tokens=4, temperature=0, stream=True))
    assert content == auto.choices[0].message.content and calls == []


def test_round_trip_messages_render(server) -> None:
    """An assistant message with tool_calls and the tool's answer render through the template (the arguments as
    the JSON object the template writes with tojson)."""
    from frugallm.serve.protocol import ChatCompletionRequest

    msgs = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    conv = ChatCompletionRequest.model_validate({"messages": msgs, "tools": TOOLS}).conversation()
    text = server.engine.tokenizer.apply_chat_template(conv, tools=TOOLS)
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    assert f"<tool_call>\n{call}\n</tool_call>" in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    r = server.client().chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=3,
                                                temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("kw", "param", "needle"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools",
     "'f'"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}], "tool_choice": "required"}, "tools",
     "nonsense"),
])
def test_bad_tools_are_400s(server, kw: dict, param: str, needle: str) -> None:
    before = server.engine.metrics.prompt_tokens.values[""]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny", messages=ASK, max_tokens=3, **kw)
    body = e.value.body
    assert needle in body["message"] and param in (body["param"] or body["message"]), body
    assert server.engine.metrics.prompt_tokens.values[""] == before


def test_template_without_tools_is_a_400(server) -> None:
    tok = server.engine.tokenizer
    template = tok.chat_template
    try:
        tok.chat_template = None  # ChatML: no tool format
        with pytest.raises(openai.BadRequestError, match="tool-call format"):
            server.client().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=3)
        tok.chat_template = template.replace("{%- if tools %}", "{%- if false %}")  # mentions <tool_call>, drops tools
        with pytest.raises(openai.BadRequestError, match="does not render tool definitions"):
            server.client().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=3)
        tok.chat_template = template.replace("{{- tool | tojson }}", "{{- raise_exception('no tools here') }}")
        with pytest.raises(openai.BadRequestError, match="no tools here"):
            server.client().chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=3)
    finally:
        tok.chat_template = template


# -- Qwen2.5-Coder-0.5B: a real round trip --------------------------------------------------------------------
QWEN = Path.home() / ".cache" / "frugallm" / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


@pytest.fixture(scope="module")
def qwen_server():
    if not QWEN.is_file():
        pytest.skip(f"{QWEN} is absent (frugallm fetch qwen2.5-coder-0.5b)")
    with LiveServer(LLM(str(QWEN), device="cpu"), "qwen", kv_memory_gb=0.2, max_num_seqs=2) as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_qwen_round_trip(qwen_server, stream: bool) -> None:
    srv = qwen_server
    client = srv.client()
    kw = {"model": "qwen", "tools": TOOLS, "temperature": 0, "max_tokens": 60}
    # tool_choice="required": under "auto" the 0.5B coder model answers with the call as a ```json block
    # instead of its <tool_call> tags (greedy, this prompt); the grammar keeps it to its own format.
    first = {**kw, "tool_choice": "required"}
    if stream:
        content, calls, finish = collect_stream(client.chat.completions.create(messages=ASK, stream=True,
                                                                               **first))
    else:
        r = client.chat.completions.create(messages=ASK, **first)
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in r.choices[0].message.tool_calls or []]
    assert finish == "tool_calls", content
    (call,) = calls
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] == "Paris"
    fn = {"name": call["name"], "arguments": call["arguments"]}
    msgs = [*ASK, {"role": "assistant", "content": content or None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": fn}]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature_celsius": 23, "sky": "sunny"}'}]
    # The answer with tool_choice="none" (tools not rendered): under "auto" greedy decoding of this 0.5B model
    # flips between answering and writing its calls again as bare JSON with the last bits of the CPU's sums.
    answer = client.chat.completions.create(messages=msgs, **{**kw, "tool_choice": "none"})
    text = answer.choices[0].message.content
    assert answer.choices[0].message.tool_calls is None, text
    assert "23" in text and answer.choices[0].finish_reason == "stop", text
    assert srv.engine.block_manager.num_used_blocks == 0
