"""Generation loop on a tiny random model: streaming, stops, seeds, batching, chat, score, caching."""

from __future__ import annotations

import pytest
import torch

from frugallm import LLM, SamplingParams, cpu


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models.gguf("llama", "F32")), dtype="float32", device="cpu")


def test_stream_concatenates_to_generate_text(llm: LLM) -> None:
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = llm.generate(["hello world"], p)[0]
    deltas = list(llm.stream("hello world", p))
    assert "".join(deltas) == full.text
    assert llm.last_output.token_ids == full.token_ids


def test_seed_reproducible_and_different_seeds_differ(llm: LLM) -> None:
    def run(seed: int) -> list[int]:
        p = SamplingParams(max_tokens=24, temperature=1.5, seed=seed, ignore_eos=True)
        return llm.generate(["the cat"], p)[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stop_string_cuts_text_exactly(llm: LLM) -> None:
    p = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    text = llm.generate(["abc"], p)[0].text
    assert len(text) > 6
    stop = text[3:6]
    first = text.find(stop)
    out = llm.generate(["abc"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:first]
    streamed = "".join(llm.stream("abc", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,))))
    assert streamed == text[:first]


def test_stop_token_ids_and_max_tokens(llm: LLM) -> None:
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ids = llm.generate(["x y z"], p)[0].token_ids
    assert len(ids) == 10
    out = llm.generate(
        ["x y z"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=(ids[3],))
    )
    assert out[0].finish_reason == "stop" and out[0].token_ids[-1] == ids[3]
    assert len(out[0].token_ids) == ids.index(ids[3]) + 1


def test_eos_stops_unless_ignored(llm: LLM) -> None:
    eos = min(llm.tokenizer.eos_ids)
    # bias the model towards EOS by making it a stop target at any sampled step: use logits check instead
    p = SamplingParams(max_tokens=40, temperature=0)
    out = llm.generate(["hello"], p)[0]
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "stop":
        assert out.token_ids[-1] in llm.tokenizer.eos_ids
    assert eos in llm.tokenizer.eos_ids


def test_batch_with_padding_matches_single(llm: LLM) -> None:
    prompts = ["a", "the quick brown fox jumps", "12 34", "hello there, how are you doing today?"]
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batched = llm.generate(prompts, p)
    for prompt, b in zip(prompts, batched, strict=True):
        single = llm.generate([prompt], p)[0]
        assert single.token_ids == b.token_ids, prompt
        assert single.prompt_token_ids == b.prompt_token_ids


def test_batch_logits_match_single_with_padding(llm: LLM) -> None:
    """Left padding must not change the computation: compare last-position logits."""
    short, long = llm.tokenizer.encode("hi"), llm.tokenizer.encode("a much longer prompt than the other one")
    cache = llm.make_cache(2, 64, [len(long) - len(short), 0])
    ids = torch.zeros(2, len(long), dtype=torch.long)
    ids[0, len(long) - len(short) :] = torch.tensor(short)
    ids[1] = torch.tensor(long)
    pos = (torch.arange(len(long))[None] - torch.tensor([len(long) - len(short), 0])[:, None]).clamp(min=0)
    batched = llm.model(ids, pos, cache, "last")
    for row, seq in enumerate((short, long)):
        single = llm.score(seq)[-1]
        assert torch.allclose(batched[row], single, atol=1e-5)


def test_per_prompt_sampling_params(llm: LLM) -> None:
    outs = llm.generate(
        ["a", "b"], [SamplingParams(max_tokens=3, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)]
    )
    assert [len(o.token_ids) for o in outs] == [3, 5]


def test_penalties_change_greedy_output(llm: LLM) -> None:
    base = llm.generate(["a a a a"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids
    pen = llm.generate(
        ["a a a a"],
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=5.0, frequency_penalty=2.0),
    )[0].token_ids
    assert len(set(pen)) >= len(set(base))


def test_logprobs_returned(llm: LLM) -> None:
    out = llm.generate(["hi"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in lp and lp[tok] <= 0 and len(lp) >= 3


def test_chat_applies_template(llm: LLM) -> None:
    prompt = llm.chat_prompt([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user" in prompt and prompt.endswith("<|im_start|>assistant\n")
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode(prompt, add_special_tokens=True)


def test_score_matches_incremental_decode(llm: LLM) -> None:
    ids = llm.tokenizer.encode("one two three four five six")
    full = llm.score(ids)
    cache = llm.make_cache(1, len(ids))
    step = []
    for i, t in enumerate(ids):
        step.append(llm.model(torch.tensor([[t]]), torch.tensor([[i]]), cache, "last")[0])
    assert torch.allclose(full, torch.stack(step), atol=1e-5)
    assert cache.nbytes() == 2 * llm.config.num_layers * llm.config.kv_size * len(ids) * 4


def test_kv_cache_bytes_reported(llm: LLM) -> None:
    out = llm.generate(["hello"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    slots = len(out.prompt_token_ids) + len(out.token_ids) - 1
    assert out.metrics["kv_cache_bytes"] == 2 * llm.config.num_layers * llm.config.kv_size * slots * 4


def test_second_load_uses_cache(tiny_models) -> None:
    path = str(tiny_models.gguf("llama", "Q8_0"))
    first = LLM(path, dtype="float32", device="cpu")
    second = LLM(path, dtype="float32", device="cpu")
    assert second.loaded.from_cache
    ids = first.tokenizer.encode("cache me")
    assert torch.equal(first.score(ids), second.score(ids))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_close_to_fp32(tiny_models, llm: LLM, dtype: str) -> None:
    half = LLM(str(tiny_models.gguf("llama", "F32")), dtype=dtype, device="cpu")
    ids = llm.tokenizer.encode("the quick brown fox jumps over the lazy dog " * 3)
    ref, out = llm.score(ids), half.score(ids)
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() > 0.9
    gen = half.generate(["hello"], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0))[0]
    assert len(gen.token_ids) == 8


def test_compiled_decode_matches_eager(tiny_models, tmp_path, monkeypatch) -> None:
    """``compile=True`` runs decode steps through torch.compile'd layer halves: same tokens, cost recorded."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path = str(tiny_models.gguf("llama", "F32"))
    eager = LLM(path, dtype="float32", device="cpu")
    compiled = LLM(path, dtype="float32", device="cpu", compile=True)
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    assert eager.compile_seconds is None
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for prompt in ("Hello world", "A longer prompt with several words in it"):
        assert compiled.generate(prompt, params)[0].token_ids == eager.generate(prompt, params)[0].token_ids


@pytest.mark.skipif(not cpu.onednn_bf16(), reason="oneDNN's bf16 packing needs AVX-512 (BW/VL/DQ)")
def test_packed_bf16_linears_are_bit_identical_and_can_be_switched_off(tiny_models, monkeypatch) -> None:
    monkeypatch.setenv("FRUGALLM_NATIVE", "0")  # oneDNN's packing: bit-identical (native: test_packed_linear.py)
    path = str(tiny_models.gguf("llama", "F32"))
    packed = LLM(path, dtype="bfloat16", device="cpu", pack_weights=True)
    plain = LLM(path, dtype="bfloat16", device="cpu", pack_weights=False)
    ids = packed.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    assert torch.equal(packed.score(ids), plain.score(ids))
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert packed.generate("hello", p)[0].token_ids == plain.generate("hello", p)[0].token_ids
    copies = sum(getattr(m, "packed_bytes", 0) for m in packed.model.modules())
    linear_bytes = sum(m.weight.numel() * 2 for m in packed.model.modules() if isinstance(m, torch.nn.Linear))
    assert copies == linear_bytes > 0  # the memory the speed costs, reported
    assert sum(getattr(m, "packed_bytes", 0) for m in plain.model.modules()) == 0
    assert packed.model.set_packing(False) == linear_bytes
    assert sum(getattr(m, "packed_bytes", 0) for m in packed.model.modules()) == 0
