"""The official ``openai`` client against a real uvicorn server on 127.0.0.1.

Several clients at once; every answer must equal the same request run alone through ``LLM.generate``
(greedy: batching must not change tokens). The tiny model covers the API surface quickly; the default
model (fp32, few tokens) checks parity on real weights.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from frugallm import LLM, SamplingParams
from live_server import LiveServer

pytestmark = pytest.mark.usefixtures("one_thread")


openai = pytest.importorskip("openai")


def alone(llm: LLM, prompt: str | list[int], n: int) -> Any:
    return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]


def stream_text(stream: Any) -> tuple[str, Any]:
    parts, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            delta = getattr(c, "delta", None)
            parts.append(delta.content or "" if delta is not None else c.text or "")
    return "".join(parts), usage


# -- tiny model: the API surface --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


def test_openai_client_tiny(tiny: LLM) -> None:
    prompts = ["the cat", "a dog and", "hello world, this is", "x"]
    refs = [alone(tiny, p, 12) for p in prompts]
    chat = [{"role": "user", "content": "Say hi"}]
    chat_ref = alone(tiny, tiny.chat_prompt(chat), 9)
    with LiveServer(tiny, "tiny", num_blocks=128, block_size=4, max_num_seqs=4) as srv:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == ["tiny"]

        def complete(i: int) -> str:
            kw = {"model": "tiny", "prompt": prompts[i], "max_tokens": 12, "temperature": 0,
                  "extra_body": {"ignore_eos": True}}
            if i % 2:
                text, usage = stream_text(client.completions.create(stream=True,
                                                                    stream_options={"include_usage": True}, **kw))
                assert usage.completion_tokens == 12
                return text
            r = client.completions.create(**kw)
            assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
            return r.choices[0].text

        with ThreadPoolExecutor(len(prompts)) as pool:  # more clients than max_num_seqs: some wait
            texts = list(pool.map(complete, range(len(prompts))))
        assert texts == [r.text for r in refs]

        r = client.chat.completions.create(model="tiny", messages=chat, max_tokens=9, temperature=0,
                                           extra_body={"ignore_eos": True}, logprobs=True, top_logprobs=2, n=2)
        assert [c.message.content for c in r.choices] == [chat_ref.text] * 2
        assert len(r.choices[0].logprobs.content) == 9
        text, _ = stream_text(client.chat.completions.create(model="tiny", messages=chat, max_tokens=9,
                                                             temperature=0, stream=True,
                                                             extra_body={"ignore_eos": True}))
        assert text == chat_ref.text

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=0)
        assert e.value.body["param"] == "max_tokens"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=chat, max_tokens=10**6)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).models.list()
        assert srv.engine.block_manager.num_used_blocks == 0


# -- the default model: parity with LLM.generate ------------------------------------------------------------
@pytest.mark.slow
def test_openai_client_default_model_parity() -> None:
    llm = LLM("default", dtype="float32", device="cpu")
    prompts = ["The capital of France is", "def add(a, b):", "My favourite fruit is", "Once upon a time"]
    n_tok = 5
    refs = [alone(llm, p, n_tok).text for p in prompts]
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    chat_ref = alone(llm, llm.chat_prompt(chat), n_tok).text
    with LiveServer(llm, "default", kv_memory_gb=0.1, max_num_seqs=8) as srv:
        client = srv.client()

        def complete(i: int) -> str:
            kw = {"model": "default", "prompt": prompts[i], "max_tokens": n_tok, "temperature": 0,
                  "extra_body": {"ignore_eos": True}}
            if i % 2:
                return stream_text(client.completions.create(stream=True, **kw))[0]
            return client.completions.create(**kw).choices[0].text

        def chat_once(_: int) -> str:
            r = client.chat.completions.create(model="default", messages=chat, max_tokens=n_tok, temperature=0,
                                               extra_body={"ignore_eos": True})
            return r.choices[0].message.content

        with ThreadPoolExecutor(6) as pool:
            done = pool.map(complete, range(len(prompts)))
            chats = pool.map(chat_once, range(2))
            texts, chat_texts = list(done), list(chats)
    assert texts == refs
    assert chat_texts == [chat_ref] * 2
