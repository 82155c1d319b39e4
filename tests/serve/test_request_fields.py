"""Request fields real clients send: echo + logprobs (prompt log-probabilities, lm-eval's loglikelihood
requests), ``/tokenize`` / ``/detokenize`` / ``/tokenizer_info``, ``logit_bias``, ``stop_token_ids``,
``min_tokens``, and a 400 naming any field the server does not implement."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from frugallm import LLM, SamplingParams
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm(tiny_models: Any) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def client(llm: LLM) -> Iterator[TestClient]:
    # A small step budget: long prompts are prefilled in several chunks.
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8, max_num_batched_tokens=8))
    with TestClient(create_app(AsyncLLM(engine).start(), "tiny")) as c:
        yield c


def ref_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """In-process log-probabilities ``[len(ids), vocab]``; row ``j`` predicts token ``j + 1``."""
    return llm.score(ids).log_softmax(-1)


def test_echo_logprobs_max_tokens_0_are_the_prompts(client: TestClient, llm: LLM) -> None:
    a = llm.tokenizer.encode("The cat sat on the mat and then it looked at the dog", add_special_tokens=True)
    b = a[:5]
    # twice: the second time the prompt's blocks are in the prefix cache, and must be recomputed for logits
    for _ in range(2):
        r = client.post("/v1/completions", json={"prompt": [a, b], "max_tokens": 0, "echo": True, "logprobs": 2,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["usage"]["completion_tokens"] == 0 and j["usage"]["prompt_tokens"] == len(a) + len(b)
        for ids, choice in zip((a, b), j["choices"], strict=True):
            lp = choice["logprobs"]
            ref = ref_logprobs(llm, ids)
            assert choice["text"] == llm.tokenizer.decode(ids, skip_special_tokens=False)
            assert choice["finish_reason"] == "length"
            assert lp["tokens"] == [llm.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
            assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
            for i, top in enumerate(lp["top_logprobs"][1:], start=1):
                best = ref[i - 1].topk(2)
                assert len(top) <= 2 and max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-4)
            offsets = [0]
            for t in lp["tokens"][:-1]:
                offsets.append(offsets[-1] + len(t))
            assert lp["text_offset"] == offsets


def test_echo_logprobs_with_generation_is_lm_eval_shape(client: TestClient, llm: LLM) -> None:
    """lm-eval sends ``max_tokens=1, echo, logprobs=1`` and drops the last entry: prompt then generated token."""
    ids = llm.tokenizer.encode("Once upon a time there", add_special_tokens=True)
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                                             "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    ref = ref_logprobs(llm, ids)
    assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1].max()), abs=1e-4)  # greedy: the argmax
    assert lp["token_logprobs"][1:-1] == pytest.approx([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                      abs=1e-4)
    greedy_tok = int(ref[-1].argmax())
    assert choice["text"] == llm.tokenizer.decode(ids, skip_special_tokens=False) + llm.tokenizer.decode([greedy_tok])


def test_text_prompt_echo_logprobs(client: TestClient, llm: LLM) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hello there world", "max_tokens": 0, "echo": True,
                                             "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = llm.tokenizer.encode("Hello there world", add_special_tokens=True)
    assert choice["text"] == "Hello there world" and len(choice["logprobs"]["tokens"]) == len(ids)
    assert all(t == {} for t in choice["logprobs"]["top_logprobs"][1:])  # logprobs=0: the token's own only


def test_prompt_logprobs_in_llm_generate(llm: LLM) -> None:
    ids = llm.tokenizer.encode("a b c d e f g", add_special_tokens=True)
    out = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    ref = ref_logprobs(llm, ids)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    got = [out.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))]
    assert got == pytest.approx([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)


def test_tokenize_detokenize_tokenizer_info(client: TestClient, llm: LLM) -> None:
    tok = llm.tokenizer
    r = client.post("/tokenize", json={"prompt": "The cat sat", "return_token_strs": True}).json()
    ids = tok.encode("The cat sat", add_special_tokens=True)
    assert r == {"count": len(ids), "max_model_len": r["max_model_len"], "tokens": ids,
                 "token_strs": [tok.id_to_token(i) for i in ids]}
    r = client.post("/tokenize", json={"prompt": "The cat sat", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("The cat sat") and r["token_strs"] is None
    msgs = [{"role": "user", "content": "hi"}]
    r = client.post("/tokenize", json={"messages": msgs}).json()
    assert r["tokens"] == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert client.post("/detokenize", json={"tokens": ids}).json() == {
        "prompt": tok.decode(ids, skip_special_tokens=False)}
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.id_to_token(min(tok.eos_ids)) and info["chat_template"] == tok.chat_template
    for path, body, param in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "x", "messages": msgs}, "prompt"),
                              ("/detokenize", {"tokens": [10**6]}, "tokens"), ("/detokenize", {"tokens": [-1]}, None),
                              ("/tokenize", {"prompt": "x", "truncate_prompt_tokens": 3}, None),
                              ("/tokenize", {"prompt": "x", "model": "other"}, "model")]:
        r = client.post(path, json=body)
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (path, body)
        if param is not None:
            assert r.json()["error"]["param"] == param


def complete(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"prompt": "The cat sat on", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_logit_bias_forces_and_bans_tokens(client: TestClient, llm: LLM) -> None:
    ids = llm.tokenizer.encode("The cat sat on", add_special_tokens=True)
    forced = 77
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                             "logit_bias": {str(forced): 100}})
    assert r.status_code == 200, r.text
    # the choice's tokens via prompt-as-ids echo-free check: every generated token is the forced one
    assert r.json()["choices"][0]["text"] == llm.tokenizer.decode([forced] * 4)
    plain = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0].token_ids[0]
    banned = complete(client, prompt=ids, max_tokens=1, ignore_eos=True, logit_bias={str(plain): -100},
                      logprobs=1)
    assert banned["logprobs"]["tokens"][0] != llm.tokenizer.decode([plain], skip_special_tokens=False)


def test_min_tokens_and_stop_token_ids(client: TestClient, llm: LLM) -> None:
    ids = llm.tokenizer.encode("The cat sat on", add_special_tokens=True)
    run = llm.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    stop = run[2]
    first = run.index(stop)  # generation ends on the stop id, which is not part of the text
    c = complete(client, prompt=ids, max_tokens=8, stop_token_ids=[stop], ignore_eos=True, logprobs=0)
    assert c["finish_reason"] == "stop" and len(c["logprobs"]["tokens"]) == first + 1
    # min_tokens masks the stop id until that many tokens exist
    c = complete(client, prompt=ids, max_tokens=8, stop_token_ids=[stop], ignore_eos=True, min_tokens=first + 2,
                 logprobs=0)
    want = llm.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=(stop,),
                                            min_tokens=first + 2))[0]
    assert stop not in want.token_ids[: first + 2] and len(want.token_ids) >= first + 2
    assert c["text"] == want.text and len(c["logprobs"]["tokens"]) == len(want.token_ids)


def test_unsupported_fields_are_named(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "x", "use_beam_search": True, "guided_json": {}})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "'guided_json'" in msg and "'use_beam_search'" in msg
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x", "audio": {}}]})
    assert r.status_code == 400 and "'audio'" in r.json()["error"]["message"]
    # null asks for nothing: accepted, as are all the fields the server implements
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "suffix": None,
                                                "best_of": None, "parallel_tool_calls": None}).status_code == 200
