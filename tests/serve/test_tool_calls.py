"""Tool-call formats on fixed strings: each family's parser, its streaming (every chunk boundary), its grammar
(a real call of the family is accepted token by token, anything else is not), and format detection."""

from __future__ import annotations

import json

import pytest

from frugallm import LLM
from frugallm.errors import InvalidRequestError
from frugallm.serve.tool_calls import ToolSpec, tool_specs
from frugallm.serve.tool_formats import HermesFormat, Llama3JsonFormat, MistralFormat, format_for
from frugallm.serve.tool_stream import ToolStream

WEATHER = ToolSpec("get_weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                                  "unit": {"enum": ["C", "F"]}},
                                   "required": ["city"], "additionalProperties": False})
TIME = ToolSpec("get_time", {"type": "object", "properties": {}})


@pytest.fixture(scope="module")
def tiny(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
MISTRAL = 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", ' \
          '"arguments": {}}]'
LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
EXPECTED = [("get_weather", {"city": "Paris"}), ("get_time", {})]
CASES = [(HermesFormat, HERMES, "Let me check."), (MistralFormat, MISTRAL, "Sure."), (Llama3JsonFormat, LLAMA, "")]


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(("cls", "text", "content"), CASES)
def test_parse(tiny: LLM, cls, text: str, content: str) -> None:
    fmt = cls(tiny.tokenizer)
    got_content, calls = fmt.parse(text)
    assert got_content == content and calls_of(calls) == EXPECTED
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("chatcmpl-tool-") for c in calls)
    assert fmt.parse("just an answer, no calls") == ("just an answer, no calls", [])


@pytest.mark.parametrize(("cls", "text"), [
    (HermesFormat, '<tool_call>\n{"name": "f", "arguments": {"a": </tool_call>'),  # broken JSON
    (HermesFormat, '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
    (MistralFormat, '[TOOL_CALLS][{"name": "f", "arguments": 3}]'),  # arguments not an object
    (Llama3JsonFormat, '{"name": "f", "parameters": {}} and then some text'),
    (Llama3JsonFormat, '{"not": "a call"}'),
])
def test_malformed_calls_are_content(tiny: LLM, cls, text: str) -> None:
    assert cls(tiny.tokenizer).parse(text) == (text, [])


def test_variants(tiny: LLM) -> None:
    tok = tiny.tokenizer
    # Llama after <|python_tag|>, with "arguments" instead of "parameters"; arguments given as a JSON string.
    assert calls_of(Llama3JsonFormat(tok).parse('<|python_tag|>{"name": "f", "arguments": {"x": 1}}')[1]) == [
        ("f", {"x": 1})]
    assert calls_of(HermesFormat(tok).parse('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}')[1]) == [
        ("f", {"x": 2})]  # no closing tag (cut at max_tokens or by a stop string): still a call
    assert calls_of(MistralFormat(tok).parse('[TOOL_CALLS]{"name": "f", "arguments": {}}')[1]) == [("f", {})]


def stream(fmt, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]], int]:
    """Feed ``text`` cut at ``cuts``, the last piece with the end; the content, the calls assembled from their
    deltas as OpenAI's client does (``(name, arguments)``), and how many argument pieces came."""
    s = ToolStream(fmt)
    deltas = []
    bounds = [0, *cuts, len(text)]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        deltas.append(s.step(text[a:b], i == len(bounds) - 2))
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict[str, str]] = {}
    pieces = 0
    for d in deltas:
        indices = [tc["index"] for tc in d.get("tool_calls", [])]
        assert len(indices) == len(set(indices))  # one entry per call in a delta
        for tc in d.get("tool_calls", []):
            if tc["index"] not in calls:  # the first delta of a call names it
                assert tc["id"].startswith("chatcmpl-tool-") and tc["type"] == "function" and tc["function"]["name"]
                calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            else:
                assert "id" not in tc and "name" not in tc["function"]
            pieces += bool(tc["function"].get("arguments"))
            calls[tc["index"]]["arguments"] += tc["function"].get("arguments", "")
    assert sorted(calls) == list(range(len(calls)))
    return content, [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)], pieces


@pytest.mark.parametrize(("cls", "text", "content"), CASES)
def test_stream_every_boundary(tiny: LLM, cls, text: str, content: str) -> None:
    fmt = cls(tiny.tokenizer)
    whole = [(c.name, c.arguments) for c in fmt.parse(text)[1]]  # the unstreamed answer's calls, exactly
    assert [(n, json.loads(a)) for n, a in whole] == EXPECTED
    for cut in range(len(text) + 1):  # one boundary anywhere, tags split included
        got = stream(fmt, text, [cut])
        assert got[0].rstrip("\n") == content and got[1] == whole, cut
    got = stream(fmt, text, list(range(1, len(text))))  # one character at a time
    assert got[0].rstrip("\n") == content and got[1] == whole
    if cls is not MistralFormat:  # arguments arrive in pieces as they are written (Mistral's array: also)
        assert got[2] > len(whole)


def test_stream_arguments_piece_by_piece(tiny: LLM) -> None:
    s = ToolStream(HermesFormat(tiny.tokenizer))
    assert s.feed("<tool_call>\n") == {}
    assert s.feed('{"name": "get_weather", "arg') == {}
    first = s.feed('uments": {"ci')
    (tc,) = first["tool_calls"]
    assert tc["function"] == {"name": "get_weather", "arguments": '{"ci'} and tc["index"] == 0
    assert s.feed('ty": "Par') == {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]}
    assert s.feed('is"}') == {"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}
    assert s.feed("  ") == {}  # blanks after the arguments are not theirs
    assert s.feed("}\n</tool_call>") == {} and s.finish() == {}
    assert s.calls == [tc["id"]]


def test_stream_holds_back_only_possible_tags(tiny: LLM) -> None:
    s = ToolStream(HermesFormat(tiny.tokenizer))
    assert s.feed("a < b, <to") == {"content": "a < b, "}  # "<to" may open <tool_call>
    assert s.feed("ys>") == {"content": "<toys>"}
    assert s.finish() == {}
    plain = ToolStream(Llama3JsonFormat(tiny.tokenizer))
    assert plain.feed("  ") == {} and plain.feed("Hi") == {"content": "  Hi"}
    assert plain.feed(" {x}") == {"content": " {x}"} and plain.finish() == {}


@pytest.mark.parametrize(("cls", "text"), [
    (HermesFormat, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
                   '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    (MistralFormat, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
    (Llama3JsonFormat, '{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "A"}}'),
])
def test_grammar_accepts_the_format(tiny: LLM, cls, text: str) -> None:
    pytest.importorskip("llguidance")
    from frugallm.structured import backend_for

    fmt = cls(tiny.tokenizer)
    backend = backend_for(tiny.tokenizer, tiny.config.vocab_size)
    m = backend.compile("grammar", fmt.grammar([WEATHER, TIME]))
    assert all(m.accept(t) for t in tiny.tokenizer.encode(text))
    assert calls_of(fmt.parse(text)[1])
    bad = text.replace("get_weather", "get_wether")  # a tool that does not exist
    m = backend.compile("grammar", fmt.grammar([WEATHER, TIME]))
    assert not all(m.accept(t) for t in tiny.tokenizer.encode(bad))
    m = backend.compile("grammar", fmt.grammar([TIME], parallel=False))  # one named tool, one call
    assert not all(m.accept(t) for t in tiny.tokenizer.encode(text))


def test_format_for_and_specs(tiny: LLM) -> None:
    tok = tiny.tokenizer
    assert isinstance(format_for("...<tool_call>...", tok), HermesFormat)
    assert isinstance(format_for("...[TOOL_CALLS]...", tok), MistralFormat)
    assert isinstance(format_for("{{ '<|python_tag|>' }}", tok), Llama3JsonFormat)
    for template in (None, "{{ messages }}"):
        with pytest.raises(InvalidRequestError, match="tool-call format") as e:
            format_for(template, tok)
        assert e.value.param == "tools"
    assert tool_specs([{"type": "function", "function": {"name": "f"}}]) == [
        ToolSpec("f", {"type": "object", "properties": {}})]
    with pytest.raises(InvalidRequestError, match=r"tools\[1\].*'g'.*object") as e:
        tool_specs([{"function": {"name": "f"}}, {"function": {"name": "g", "parameters": {"type": "string"}}}])
    with pytest.raises(InvalidRequestError, match="twice"):
        tool_specs([{"function": {"name": "f"}}, {"function": {"name": "f"}}])


# What Qwen2.5-Coder-0.5B wrote under tool_choice="auto" (greedy): its calls without the <tool_call> tags.
FENCED = '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```'
BARE = '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"name": "get_time", "arguments": {}}'


@pytest.mark.parametrize(("text", "names"), [(FENCED, ["get_weather"]), (BARE, ["get_weather", "get_time"])])
def test_hermes_untagged_calls_of_known_tools(tiny: LLM, text: str, names: list[str]) -> None:
    fmt = HermesFormat(tiny.tokenizer, frozenset({"get_weather", "get_time"}))
    content, calls = fmt.parse(text)
    assert content == "" and [c.name for c in calls] == names
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    for cut in range(0, len(text) + 1, 3):
        got = stream(fmt, text, [cut])
        assert got[0] == "" and got[1] == [(c.name, c.arguments) for c in calls], cut
    # Not calls: no tools given, an unknown name, other text around them, another fence language.
    assert HermesFormat(tiny.tokenizer).parse(text) == (text, [])
    assert HermesFormat(tiny.tokenizer, frozenset({"get_time"})).parse(FENCED) == (FENCED, [])
    for other in (f"Here: {BARE}", f"{BARE}\nDone.", FENCED.replace("```json", "```python"), '{"a": 1}'):
        assert fmt.parse(other) == (other, [])
        assert stream(fmt, other, [5])[:2] == (other, [])  # held back, then sent whole as content
