"""The decode fast path (``model/decode_plan.py``) computes exactly what the modules compute."""

from __future__ import annotations

import pytest
import torch

from frugallm import LLM, SamplingParams
from frugallm.model.decode_plan import DecodePlan

PROMPTS = ["hello world, this is a test", "a"]


def decode_logits(llm: LLM, fast: bool, steps: int = 6) -> torch.Tensor:
    """Teacher-forced decode logits ``[steps, B, vocab]`` after a left-padded batch prefill."""
    llm.model.fast_decode = fast
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    t = max(map(len, ids))
    pads = [t - len(x) for x in ids]
    x = torch.tensor([[0] * p + i for p, i in zip(pads, ids, strict=True)])
    pos = (torch.arange(t)[None] - torch.tensor(pads)[:, None]).clamp(min=0)
    cache = llm.make_cache(len(ids), t + steps, pads)
    out = [llm.model(x, pos, cache, "last")]
    nxt = pos[:, -1:] + 1
    for i in range(steps):
        tok = torch.full((len(ids), 1), 7 + i)
        out.append(llm.model(tok, nxt + i, cache, "last"))
    llm.model.fast_decode = True
    return torch.stack(out)


@pytest.mark.parametrize(
    ("arch", "dtype", "quant", "kv"),
    [
        ("llama", "float32", None, None),
        ("qwen2", "float32", None, None),  # qkv bias
        ("qwen3", "float32", None, None),  # q/k norms
        ("llama", "bfloat16", None, None),
        ("llama", "float16", None, None),
        ("llama", "float32", "int4:group=32:head=8", None),  # raw int4 op + int8 head
        ("llama", "float32", "int8", None),  # module forward fallback
        ("llama", "float32", "int3:group=32", None),
        ("llama", "float32", None, "kivi:bits=2"),
        ("llama", "float32", None, "snapkv:budget=0.5"),
    ],
)
def test_plan_matches_modules(tiny_models, arch: str, dtype: str, quant: str | None, kv: str | None) -> None:
    llm = LLM(str(tiny_models.hf(arch)), dtype=dtype, device="cpu", quant=quant, kv=kv)
    fast, slow = decode_logits(llm, True), decode_logits(llm, False)
    assert torch.equal(fast, slow)


def test_plan_rebuilt_when_modules_or_weights_change(tiny_models) -> None:
    llm = LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate("hello", p)
    plan = llm.model._plan
    assert isinstance(plan, DecodePlan)
    llm.generate("hello", p)
    assert llm.model._plan is not plan  # every prefill drops it: weights may change between generations
    llm.model.half()
    assert llm.model._plan is None
    llm.model.float()
    from frugallm.quant import quantize_model

    llm.generate("hello", p)
    quantize_model(llm.model, "int4:group=32")
    assert not llm.model._plan.valid_for(llm.model, torch.float32, torch.device("cpu"))


def test_hooks_fire_with_fast_decode_off(tiny_models) -> None:
    llm = LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")
    calls = []
    llm.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    llm.generate("hello", p)
    assert len(calls) == 1  # the prefill only: planned decode steps skip module hooks
    llm.model.fast_decode = False
    calls.clear()
    llm.generate("hello", p)
    assert len(calls) == 5
