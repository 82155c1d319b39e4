"""Parity with Hugging Face ``transformers`` on the real default model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import pytest
import torch

from frugallm import LLM, SamplingParams
from frugallm.corpus import builtin_corpus
from frugallm.loading import default_model_path

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    p = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    return tok, model


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("default", dtype="float32", device="cpu")


def test_tokenizer_matches_transformers(hf, llm: LLM) -> None:
    tok, _ = hf
    text = builtin_corpus()[:3000] + (
        "\nünïcödé 日本語 emoji 🙂🙃 digits 1234567890 3.14159 code: def f(x):\n\treturn x**2  # comment\n"
        "    multiple     spaces\n\n\nnew lines <|im_start|>user\nhi<|im_end|>"
    )
    assert llm.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False)
    ids = llm.tokenizer.encode(text)
    assert llm.tokenizer.decode(ids, skip_special_tokens=False) == tok.decode(ids)


def test_teacher_forced_logits_match(hf, llm: LLM) -> None:
    _, model = hf
    ids = llm.tokenizer.encode(builtin_corpus()[10_000:14_000])[:512]
    assert len(ids) == 512
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    ours = llm.score(ids)
    agree = (ref.argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert agree >= 0.99
    assert (ref - ours).abs().max().item() < 1e-3


def test_greedy_chat_continuations_identical(hf, llm: LLM) -> None:
    _, model = hf
    for q in CHATS:
        prompt = llm.chat_prompt([{"role": "user", "content": q}])
        out = llm.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([out.prompt_token_ids]), max_new_tokens=32, do_sample=False, pad_token_id=0
            )[0, len(out.prompt_token_ids) :].tolist()
        assert out.token_ids == ref, q


def test_batched_generation_matches_single(llm: LLM) -> None:
    prompts = [llm.chat_prompt([{"role": "user", "content": q}]) for q in CHATS]
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    batched = llm.generate(prompts, p)
    for prompt, b in zip(prompts, batched, strict=True):
        assert llm.generate([prompt], p)[0].token_ids == b.token_ids


def test_default_dtype_agrees_with_fp32(llm: LLM) -> None:
    fast = LLM("default", device="cpu")  # engine default dtype on CPU
    ids = llm.tokenizer.encode(builtin_corpus()[20_000:23_000])[:384]
    agree = (fast.score(ids).argmax(-1) == llm.score(ids).argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
