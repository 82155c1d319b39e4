"""GGUF weights run as stored (the CPU default for ``dtype="auto"``): with fp32 activations the same logits as the
dequantized fp32 model (bf16 decode, the default on AVX512-BF16 CPUs: close, same predictions), no float copy of a
quantized matrix, no weights-cache entry, and one error line for a malformed tensor."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from frugallm import LLM, SamplingParams, cpu, native
from frugallm.cli import main
from frugallm.errors import FrugalError, ModelLoadError
from frugallm.loading import choose_weights
from frugallm.paths import cache_dir
from frugallm.quant.gguf_linear import GGUFLinear

pytestmark = pytest.mark.skipif(not native.usable("gguf_linear"), reason="native gguf kernel unavailable here")

KQ = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}  # K-quant rows: multiples of 256
# (id, arch, tensor type, hf kwargs, gguf kwargs)
CASES: list[tuple[str, str, str, dict[str, Any], dict[str, Any]]] = [
    ("llama-Q4_0", "llama", "Q4_0", {}, {}),
    ("llama-tied-Q4_1", "llama", "Q4_1", {"tie_word_embeddings": True}, {}),
    ("qwen2-Q8_0", "qwen2", "Q8_0", {}, {}),
    (
        "qwen2-tied-Q4_K_M",
        "qwen2",
        "Q4_K",
        {**KQ, "tie_word_embeddings": True},
        {"overrides": {"attn_v": "Q6_K", "ffn_down": "Q6_K"}},
    ),
    ("llama-Q5_K", "llama", "Q5_K", KQ, {"output_type": "Q6_K"}),
]
PARAMS = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
ATOL = 1e-4  # logits are O(1-10): fp32 rounding of differently ordered sums
# bf16 decode vs the fp32 model: a bf16 residual stream and bf16 logits over 2 layers (measured <= 1.7% of the
# largest logit on CASES), so relative to the largest |logit|.
BF16_RTOL = 0.04


def _pair(tiny_models, arch: str, typ: str, hf_kw: dict[str, Any], gguf_kw: dict[str, Any]) -> tuple[LLM, LLM]:
    path = str(tiny_models.gguf(arch, typ, **gguf_kw, **hf_kw))
    stored, ref = LLM(path, device="cpu"), LLM(path, dtype="float32", device="cpu")
    assert stored.weights == "stored" and ref.weights == "dequantize"
    return stored, ref


def _decode_logits(llm: LLM, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """Logits of each teacher-forced one-token decode step after a prefill of ``prompt``: ``[steps, vocab]``."""
    cache = llm.make_cache(1, len(prompt) + len(steps))
    with torch.inference_mode():
        llm.model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
        out = [llm.model(torch.tensor([[t]]), torch.tensor([[len(prompt) + i]]), cache) for i, t in enumerate(steps)]
    return torch.cat(out)


@pytest.mark.parametrize(("arch", "typ", "hf_kw", "gguf_kw"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_stored_matches_dequantized_fp32(tiny_models, tiny_ids, arch, typ, hf_kw, gguf_kw) -> None:
    stored, ref = _pair(tiny_models, arch, typ, hf_kw, gguf_kw)
    stored.model.decode_dtype = torch.float32  # the fp32-activation path (the default below AVX512-BF16)
    plan = stored.loaded.source_info["tensor_plan"]
    assert all(how == "stored" for name, how in plan.items() if name.endswith(".weight") and "norm" not in name)
    linears = [m for m in stored.model.modules() if isinstance(m, GGUFLinear)]  # a tied head is listed once
    tied = stored.config.tie_word_embeddings
    assert len(linears) == 4 * stored.config.num_layers + (1 if tied else 2)  # + embedding table, untied head
    assert (stored.model.lm_head is stored.model.embed_tokens.table) == tied
    # Decode (native kernel on the blocks, fp32 activations) and an fp32 prefill (blocks dequantized).
    dec_s = _decode_logits(stored, tiny_ids[:8], tiny_ids[8:20])
    dec_r = _decode_logits(ref, tiny_ids[:8], tiny_ids[8:20])
    torch.testing.assert_close(dec_s, dec_r, atol=ATOL, rtol=0)
    stored.model.prefill_dtype = torch.float32
    torch.testing.assert_close(stored.score(tiny_ids), ref.score(tiny_ids), atol=ATOL, rtol=0)
    # Greedy generation: single stream, and several prompts through the continuous-batching engine.
    prompts = ["hello world", "the cat sat on", "1 2 3"]
    assert stored.generate(prompts[0], PARAMS)[0].token_ids == ref.generate(prompts[0], PARAMS)[0].token_ids
    got, want = stored.generate(prompts, PARAMS), ref.generate(prompts, PARAMS)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.parametrize(("arch", "typ", "hf_kw", "gguf_kw"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_default_decode_dtype_close(tiny_models, tiny_ids, arch, typ, hf_kw, gguf_kw) -> None:
    """The default decode dtype: bf16 on AVX512-BF16 CPUs (codes meet bf16 activations in vdpbf16ps), else fp32
    (exact, as above). bf16 decode keeps the fp32 model's logits to bf16 precision and its predictions."""
    stored, ref = _pair(tiny_models, arch, typ, hf_kw, gguf_kw)
    assert stored.model.decode_dtype == (torch.bfloat16 if cpu.fast_bf16() else None)
    dec_s = _decode_logits(stored, tiny_ids[:8], tiny_ids[8:24])
    dec_r = _decode_logits(ref, tiny_ids[:8], tiny_ids[8:24])
    if stored.model.decode_dtype is None:
        torch.testing.assert_close(dec_s, dec_r, atol=ATOL, rtol=0)
        return
    assert stored.model._plan is not None and stored.model._plan.key[0] == torch.bfloat16  # DecodePlan ran in bf16
    assert ((dec_s - dec_r).abs().max() <= BF16_RTOL * dec_r.abs().max()), (dec_s - dec_r).abs().max()
    # Greedy agreement: teacher-forced next-token choices where the fp32 model's top two are not a near tie.
    top2 = dec_r.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_RTOL * dec_r.abs().max()
    assert torch.equal(dec_s.argmax(-1)[clear], dec_r.argmax(-1)[clear])
    assert (dec_s.argmax(-1) == dec_r.argmax(-1)).float().mean() >= 0.9
    # The batched engine decodes several rows per kernel call (the multi-row kernel on bf16 rows).
    outs = stored.generate(["hello world", "the cat sat on", "1 2 3"], PARAMS)
    assert [len(o.token_ids) for o in outs] == [PARAMS.max_tokens] * 3


def test_default_prefill_dtype_close(tiny_models, tiny_ids) -> None:
    """The default prefill dtype (bf16 on AVX512-BF16 CPUs, else fp32) keeps the fp32 model's predictions."""
    stored, ref = _pair(tiny_models, "qwen2", "Q8_0", {}, {})
    assert stored.model.prefill_dtype == (torch.bfloat16 if cpu.fast_bf16() else torch.float32)
    out, want = stored.score(tiny_ids), ref.score(tiny_ids)
    assert (out.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def _file_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and os.path.realpath(parts[5]) == os.path.realpath(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps")
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_no_float_copy_and_no_cache_entry(tiny_models, arch: str, monkeypatch) -> None:
    # The stored layout: the x16 repack replaces a buffer with one the same size (tests/loading/test_gguf_x16*.py).
    monkeypatch.setenv("FRUGALLM_GGUF_X16", "0")
    path = tiny_models.gguf(arch, "Q4_0")
    before = set((cache_dir() / "weights").glob("*"))
    llm = LLM(str(path), device="cpu")
    assert set((cache_dir() / "weights").glob("*")) == before, "an as-stored load writes no converted weights"
    ranges = _file_ranges(path)
    assert ranges, "the weights are a memmap of the file"
    in_file = copied = 0
    for name, t in (*llm.model.named_parameters(), *llm.model.named_buffers()):
        if t is None:
            continue
        if t.is_floating_point():
            assert t.dim() == 1, f"{name}: a float copy of a matrix ({list(t.shape)})"
            continue
        nbytes, ptr = t.numel() * t.element_size(), t.data_ptr()
        if any(lo <= ptr and ptr + nbytes <= hi for lo, hi in ranges):
            in_file += nbytes
        else:  # llama's Q/K rows are un-permuted: a copy of their blocks, nothing else
            assert arch == "llama" and ".qkv_proj.raw" in name and name.endswith(("raw0", "raw1")), name
            copied += nbytes
    assert in_file > 0
    assert copied <= in_file // 4


def test_weights_choice(tiny_models) -> None:
    gguf_path, hf = tiny_models.gguf("llama", "Q4_0"), tiny_models.hf("llama")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_weights(gguf_path, "auto", "auto", cpu)[0] == "stored"
    for kw, why in (
        ({"dtype": "float32"}, "dtype=float32"),
        ({"dtype": "auto", "quant": True}, "quant="),
        ({"dtype": "auto", "device": cuda}, "CPU-only"),
    ):
        device = kw.pop("device", cpu)
        mode, reason = choose_weights(gguf_path, "auto", kw.pop("dtype"), device, **kw)
        assert mode == "dequantize" and why in reason
    assert choose_weights(hf, "auto", "auto", cpu)[0] == "dequantize"
    assert choose_weights(gguf_path, "stored", "float32", cpu)[0] == "stored"
    with pytest.raises(FrugalError, match="dtype=bfloat16"):
        choose_weights(gguf_path, "stored", "bfloat16", cpu)
    with pytest.raises(FrugalError, match="choices: auto, stored, dequantize"):
        choose_weights(gguf_path, "float", "auto", cpu)
    # quant= and explicit dtypes keep today's path (and its weights cache)
    q = LLM(str(gguf_path), device="cpu", quant="int8")
    assert q.weights == "dequantize" and not any(isinstance(m, GGUFLinear) for m in q.model.modules())
    assert LLM(str(gguf_path), device="cpu", weights="dequantize").loaded.source_info["weights"] == "dequantize"


def test_mixed_file_dequantizes_what_the_kernel_lacks(tiny_models, tiny_ids) -> None:
    """An F16 attn_v takes its fused qkv_proj with it; the rest stays stored; logits still match."""
    path = tiny_models.gguf("qwen2", "Q8_0", overrides={"attn_v": "F16"})
    stored, ref = LLM(str(path), device="cpu"), LLM(str(path), dtype="float32", device="cpu")
    plan = stored.loaded.source_info["tensor_plan"]
    assert plan["blk.0.attn_v.weight"].startswith("dequantized: no as-stored kernel for F16")
    assert plan["blk.0.attn_q.weight"] == "dequantized: fused with blk.0.attn_v.weight (F16)"
    assert plan["blk.0.ffn_up.weight"] == "stored"
    assert not isinstance(stored.model.layers[0].attn.qkv_proj, GGUFLinear)
    assert isinstance(stored.model.layers[0].mlp.gate_up_proj, GGUFLinear)
    stored.model.prefill_dtype = stored.model.decode_dtype = torch.float32
    torch.testing.assert_close(stored.score(tiny_ids), ref.score(tiny_ids), atol=ATOL, rtol=0)


def test_info_shows_stored_split(tiny_models, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_models.gguf("qwen2", "Q8_0", overrides={"attn_v": "F16"})
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["run_as_stored"]) == {"Q8_0"}
    assert info["dequantized_at_load"]["no as-stored kernel for F16"] == 2  # attn_v of both layers
    assert info["dequantized_at_load"]["fused with blk.0.attn_v.weight (F16)"] == 2
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "run_as_stored" in out and "dequantized_at_load" in out


def _write_bad_gguf(good: Path, out: Path, victim: str) -> Path:
    """A copy of ``good`` whose ``victim`` tensor holds half the bytes its type and shape need."""
    r = gguf.GGUFReader(good)
    w = gguf.GGUFWriter(str(out), "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), vt)
    for t in r.tensors:
        data = np.array(t.data)
        shape = list(data.shape)  # the writer takes quantized shapes in bytes per row
        if t.name == victim:
            data = data[: data.shape[0] // 2]
        w.add_tensor(t.name, data, raw_shape=shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_bad_tensor_bytes_is_one_error_naming_the_tensor(tiny_models, tmp_path, capsys) -> None:
    bad = _write_bad_gguf(tiny_models.gguf("llama", "Q8_0"), tmp_path / "bad.gguf", "blk.1.ffn_up.weight")
    with pytest.raises(ModelLoadError, match="blk.1.ffn_up.weight"):
        LLM(str(bad), device="cpu")
    assert main(["generate", "--model", str(bad), "-n", "2", "hi"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "blk.1.ffn_up.weight" in err[0]


@pytest.mark.slow
def test_default_model_stored_matches_fp32() -> None:
    """SmolLM2-135M Q4_1 as stored vs dequantized fp32: same logits over a few hundred tokens, same greedy text."""
    stored, ref = LLM("default", device="cpu"), LLM("default", dtype="float32", device="cpu")
    assert stored.weights == "stored"
    assert stored.weight_bytes() < ref.weight_bytes() / 4
    ids = stored.tokenizer.encode("The history of the printing press begins in the fifteenth century. " * 20)[:300]
    stored.model.prefill_dtype = stored.model.decode_dtype = torch.float32
    torch.testing.assert_close(stored.score(ids), ref.score(ids), atol=2e-3, rtol=0)
    dec_s, dec_r = _decode_logits(stored, ids[:100], ids[100:140]), _decode_logits(ref, ids[:100], ids[100:140])
    torch.testing.assert_close(dec_s, dec_r, atol=2e-3, rtol=0)
    p = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    assert stored.generate("Once upon a time", p)[0].token_ids == ref.generate("Once upon a time", p)[0].token_ids


def test_serve_keeps_auto_dtype_for_gguf(tiny_models) -> None:
    """``frugallm serve`` forces a float dtype on CPU for other models, not for a GGUF run as stored."""
    from argparse import Namespace

    from frugallm.serve.commands import _runs_as_stored

    path = str(tiny_models.gguf("llama", "Q4_0"))
    assert _runs_as_stored(Namespace(model=path, quant=None))
    assert not _runs_as_stored(Namespace(model=path, quant="int8"))
    assert not _runs_as_stored(Namespace(model=str(tiny_models.hf("llama")), quant=None))
