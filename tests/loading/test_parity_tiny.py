"""Parity of frugallm against transformers on tiny random models (fp32, CPU).

For every architecture and checkpoint format, ``LLM(path).score(ids)`` must match the transformers reference
to 1e-4 (max abs). For GGUF files the reference is the transformers model holding exactly the GGUF's
(dequantized, un-permuted) weights, so quantization error is not part of the comparison: any difference is
a loader, dequantizer or model bug. Tokenizers built from HF folders and from GGUF metadata must encode like
the HF tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tiny_models as tm

ATOL = 1e-4
FORMATS = ["hf", "hf-sharded", "gguf-F32", "gguf-F16", "gguf-Q8_0", "gguf-Q4_1", "gguf-Q4_0"]
KQ = {"hidden_size": 256, "intermediate_size": 512}  # K-quants need rows that are multiples of 256
Q4_K_M_MIX = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}
LLAMA3 = {"rope_scaling": tm.LLAMA3_ROPE_SCALING}
TIED = {"tie_word_embeddings": True}

# (id, arch, fmt, hf_kwargs, gguf_kwargs)
EXTRA_CASES: list[tuple[str, str, str, dict[str, Any], dict[str, Any]]] = [
    ("llama-tied-hf", "llama", "hf", TIED, {}),
    ("llama-tied-gguf-F32", "llama", "gguf-F32", TIED, {}),
    ("qwen2-tied-hf", "qwen2", "hf", TIED, {}),
    ("qwen2-tied-gguf-Q8_0", "qwen2", "gguf-Q8_0", TIED, {}),
    ("qwen3-tied-gguf-Q4_0", "qwen3", "gguf-Q4_0", TIED, {}),
    ("llama-llama3rope-hf", "llama", "hf", LLAMA3, {}),
    ("llama-llama3rope-gguf-F32", "llama", "gguf-F32", LLAMA3, {}),
    ("llama-llama3rope-gguf-Q8_0", "llama", "gguf-Q8_0", LLAMA3, {}),
    ("llama-bf16-hf", "llama", "hf", {"dtype": torch.bfloat16}, {}),
    ("qwen2-fp16-hf", "qwen2", "hf", {"dtype": torch.float16}, {}),
    ("llama-v5config-hf", "llama", "hf", {"config_format": "v5"}, {}),
    ("qwen3-v5config-hf", "qwen3", "hf", {"config_format": "v5"}, {}),
    ("llama-gguf-BF16", "llama", "gguf-BF16", {}, {}),
    ("qwen2-gguf-Q5_0", "qwen2", "gguf-Q5_0", {}, {}),
    ("mistral-gguf-Q5_1", "mistral", "gguf-Q5_1", {}, {}),
    ("qwen3-gguf-Q4_0-embQ8_0", "qwen3", "gguf-Q4_0", {}, {"embed_type": "Q8_0", "output_type": "F16"}),
    ("llama-gguf-Q4_K_M", "llama", "gguf-Q4_K", {**KQ, "head_dim": 64}, {"overrides": Q4_K_M_MIX}),
    ("qwen2-gguf-Q5_K", "qwen2", "gguf-Q5_K", {**KQ, "head_dim": 64}, {}),
    ("qwen3-gguf-Q6_K", "qwen3", "gguf-Q6_K", KQ, {}),  # o_proj (128 wide) falls back to Q8_0
]

_LLM_CACHE: dict[str, Any] = {}


def load_llm(path: Path):
    from frugallm import LLM

    key = str(path)
    if key not in _LLM_CACHE:
        _LLM_CACHE[key] = LLM(key, dtype="float32", device="cpu")
    return _LLM_CACHE[key]


def build(tiny_models, arch: str, fmt: str, hf_kwargs: dict[str, Any], gguf_kwargs: dict[str, Any]):
    """(path the engine loads, reference transformers model)."""
    hf_kwargs = dict(hf_kwargs)
    if fmt == "hf-sharded":
        hf_kwargs["sharded"] = True
    if fmt in ("hf", "hf-sharded"):
        return tiny_models.hf(arch, **hf_kwargs), tiny_models.hf_reference(arch, **hf_kwargs)
    assert fmt.startswith("gguf-"), fmt
    typ = fmt.removeprefix("gguf-")
    path = tiny_models.gguf(arch, typ, **gguf_kwargs, **hf_kwargs)
    return path, tiny_models.gguf_reference(arch, typ, **gguf_kwargs, **hf_kwargs)


def check_parity(tiny_models, path: Path, ref_model, ids: list[int]) -> None:
    llm = load_llm(path)
    out = llm.score(ids)
    ref = tiny_models.reference_logits(path, ref_model, ids)
    assert isinstance(out, torch.Tensor)
    assert out.shape == ref.shape == (len(ids), ref_model.config.vocab_size)
    out = out.detach().float().cpu()
    diff = (out - ref).abs().max().item()
    assert diff <= ATOL, f"max |logits - reference| = {diff:.3e} > {ATOL:.0e} for {path.name}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_logits_parity(tiny_models, tiny_ids, arch, fmt):
    path, ref_model = build(tiny_models, arch, fmt, {}, {})
    check_parity(tiny_models, path, ref_model, tiny_ids)


@pytest.mark.parametrize(
    ("arch", "fmt", "hf_kwargs", "gguf_kwargs"), [c[1:] for c in EXTRA_CASES], ids=[c[0] for c in EXTRA_CASES]
)
def test_logits_parity_variants(tiny_models, tiny_ids, arch, fmt, hf_kwargs, gguf_kwargs):
    path, ref_model = build(tiny_models, arch, fmt, hf_kwargs, gguf_kwargs)
    check_parity(tiny_models, path, ref_model, tiny_ids)


@pytest.mark.parametrize(
    ("arch", "fmt", "hf_kwargs"),
    [("llama", "gguf-F32", LLAMA3), ("qwen3", "hf", {}), ("mistral", "gguf-Q8_0", {})],
    ids=["llama-llama3rope-gguf-F32", "qwen3-hf", "mistral-gguf-Q8_0"],
)
def test_logits_parity_long_sequence(tiny_models, arch, fmt, hf_kwargs):
    """200 positions: past llama3's original_max_position_embeddings (64), close to the 256 context."""
    path, ref_model = build(tiny_models, arch, fmt, hf_kwargs, {})
    check_parity(tiny_models, path, ref_model, tm.sample_ids(200, seed=1))


# ---------------------------------------------------------------------------------------------- tokenizer

TOKENIZER_TEXTS = [
    tm.MIXED_TEXT,
    "",
    "Hello",
    " leading space and trailing space ",
    "numbers 1234567890, 3.14159 and 2024-06-15",
    "tabs\tand\nnewlines\n\n\n  indented",
    "日本語 🦙 café Straße",
    "I'm sure they'll say we'd've DONE IT'S fine",
]


def tokenizer_model(tiny_models, fmt: str, pre: str) -> tuple[Path, Path]:
    """(engine path, HF folder holding the reference tokenizer)."""
    hf_dir = tiny_models.hf("llama", tokenizer_pre=pre)
    path = hf_dir if fmt == "hf" else tiny_models.gguf("llama", "F32", tokenizer_pre=pre)
    return path, hf_dir


@pytest.mark.parametrize("pre", tm.TOKENIZER_PRES)
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_tokenizer_encode_matches_hf(tiny_models, fmt, pre):
    path, hf_dir = tokenizer_model(tiny_models, fmt, pre)
    tok = load_llm(path).tokenizer
    for text in TOKENIZER_TEXTS:
        assert tok.encode(text) == tm.hf_encode(hf_dir, text), repr(text)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_tokenizer_special_markup(tiny_models, fmt):
    """ChatML markers in text encode to their special ids, like the HF tokenizer does."""
    path, hf_dir = tokenizer_model(tiny_models, fmt, "smollm")
    text = "<|im_start|>user\nHi there 123<|im_end|>\n<|im_start|>assistant\n"
    ids = load_llm(path).tokenizer.encode(text)
    assert ids == tm.hf_encode(hf_dir, text)
    assert ids[0] == tm.IM_START_ID and tm.IM_END_ID in ids


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_tokenizer_decode_roundtrip(tiny_models, fmt):
    path, hf_dir = tokenizer_model(tiny_models, fmt, "smollm")
    tok = load_llm(path).tokenizer
    ids = tm.hf_encode(hf_dir, tm.MIXED_TEXT)
    assert tok.decode(ids, skip_special_tokens=False) == tm.MIXED_TEXT


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_chat_template(tiny_models, fmt):
    path, _ = tokenizer_model(tiny_models, fmt, "smollm")
    text = load_llm(path).tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
