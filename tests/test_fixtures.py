"""Tests of the tiny-model fixture library itself (tests/tiny_models.py).

These prove the fixtures are right independently of frugallm: the GGUF files read back, the Q/K permutation
is llama.cpp's (transformers' own GGUF loader and a RoPE identity both agree), and the reference state dict
of a GGUF is exactly what the file stores.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

import tiny_models as tm

ARCHS = tm.ARCHS


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_and_special_ids(tiny_tokenizer_dir):
    tok = tm.load_hf_tokenizer(tiny_tokenizer_dir)
    assert 320 <= tok.get_vocab_size() <= 400
    assert [tok.token_to_id(t) for t in tm.SPECIAL_TOKENS] == [0, 1, 2]
    cfg = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["bos_token"] == "<|im_start|>"
    assert cfg["add_bos_token"] is False
    assert "<|im_start|>" in cfg["chat_template"]
    tj = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    assert tj["decoder"]["type"] == "ByteLevel"
    assert all(a["special"] for a in tj["added_tokens"])


def test_tokenizer_training_is_deterministic():
    a = tm.tokenizer_json_str("smollm")
    tm.tokenizer_json_str.cache_clear()
    assert tm.tokenizer_json_str("smollm") == a


@pytest.mark.parametrize("pre", tm.TOKENIZER_PRES)
def test_tokenizer_roundtrip(tmp_path, pre):
    tm.make_tokenizer_json(tmp_path, pre=pre)
    tok = tm.load_hf_tokenizer(tmp_path)
    ids = tok.encode(tm.MIXED_TEXT, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == tm.MIXED_TEXT
    assert len(ids) < len(tm.MIXED_TEXT.encode())  # merges are used
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode(chat, add_special_tokens=False).ids[0] == tm.IM_START_ID
    assert tok.encode(chat, add_special_tokens=False).ids[-1] == tm.IM_END_ID


def test_pre_tokenizers_match_llama_cpp_conventions(tmp_path):
    def pieces(pre, text):
        d = tmp_path / pre
        tm.make_tokenizer_json(d, pre=pre)
        return [p for p, _ in tm.load_hf_tokenizer(d).pre_tokenizer.pre_tokenize_str(text)]

    assert pieces("smollm", "ab 12345") == ["ab", "Ġ", "1", "2", "3", "4", "5"]
    assert pieces("gpt2", "ab 12345") == ["ab", "Ġ12345"]
    assert pieces("qwen2", "ab 12345") == ["ab", "Ġ", "1", "2", "3", "4", "5"]
    assert pieces("llama-bpe", "ab 12345") == ["ab", "Ġ", "123", "45"]


def test_transformers_tokenizer_agrees(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    ref = tm.hf_encode(tiny_tokenizer_dir, tm.MIXED_TEXT)
    assert tok.encode(tm.MIXED_TEXT, add_special_tokens=False) == ref
    assert tok.eos_token_id == tm.IM_END_ID and tok.bos_token_id == tm.IM_START_ID
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sample_ids():
    ids = tm.sample_ids(40)
    assert len(ids) == 40 and all(0 <= i < tm.TOKENIZER_VOCAB_SIZE for i in ids)
    assert ids == tm.sample_ids(40)


# ---------------------------------------------------------------------------------------------- HF models


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_model_loads_and_is_not_degenerate(tiny_models, tiny_ids, arch):
    d = tiny_models.hf(arch)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["num_hidden_layers"] == 2
    assert cfg["vocab_size"] == tm.load_hf_tokenizer(d).get_vocab_size()
    assert cfg["rope_theta"] == 10000.0 and "rope_parameters" not in cfg  # legacy (Hub-style) layout
    assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
    model = tiny_models.hf_reference(arch)
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32
    logits = tiny_models.reference_logits(d, model, tiny_ids)
    assert logits.shape == (len(tiny_ids), cfg["vocab_size"])
    assert 0.3 < logits.std().item() < 5.0
    assert len(set(logits.argmax(-1).tolist())) > 5
    sd = model.state_dict()
    assert all(not torch.allclose(v, torch.ones_like(v)) for k, v in sd.items() if "norm" in k)
    if arch == "qwen2":
        assert sd["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    if arch == "qwen3":
        assert cfg["head_dim"] == 32 != cfg["hidden_size"] // cfg["num_attention_heads"]
        assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)


def test_hf_model_is_deterministic(tmp_path):
    a = tm.read_hf_state_dict(tm.make_hf_model(tmp_path / "a", "llama", seed=3))
    b = tm.read_hf_state_dict(tm.make_hf_model(tmp_path / "b", "llama", seed=3))
    c = tm.read_hf_state_dict(tm.make_hf_model(tmp_path / "c", "llama", seed=4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_hf_sharded_and_config_formats_agree(tiny_models, tiny_ids):
    base = tiny_models.hf("llama")
    sharded = tiny_models.hf("llama", sharded=True)
    v5 = tiny_models.hf("llama", config_format="v5")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    assert "rope_parameters" in json.loads((v5 / "config.json").read_text())
    ref = tiny_models.reference_logits(base, tiny_models.hf_reference("llama"), tiny_ids)
    for d, kw in ((sharded, {"sharded": True}), (v5, {"config_format": "v5"})):
        out = tiny_models.reference_logits(d, tiny_models.hf_reference("llama", **kw), tiny_ids)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_hf_tied_and_bf16(tiny_models):
    tied = tiny_models.hf("qwen2", tie_word_embeddings=True)
    sd = tm.read_hf_state_dict(tied)
    assert "lm_head.weight" not in sd
    model = tiny_models.hf_reference("qwen2", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    bf16 = tiny_models.hf("llama", dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(bf16 / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_llama3_rope_config(tiny_models):
    d = tiny_models.hf("llama", rope_scaling=tm.LLAMA3_ROPE_SCALING)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 64
    model = tiny_models.hf_reference("llama", rope_scaling=tm.LLAMA3_ROPE_SCALING)
    inv = model.model.rotary_emb.inv_freq
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert not torch.allclose(inv, base)  # the scaling really changes some frequencies


# ---------------------------------------------------------------------------------------------- permutation


@pytest.mark.parametrize(("n_head", "n_head_kv", "head_dim"), [(4, 4, 16), (4, 2, 16), (8, 1, 8), (2, 2, 32)])
def test_permute_unpermute_inverse(n_head, n_head_kv, head_dim):
    g = torch.Generator().manual_seed(0)
    for n_rows_heads, kv in (
        (n_head, n_head),
        (n_head_kv, n_head_kv),
    ):  # Q: (n_head, n_head), K: (n_head, kv)
        w = torch.randn(n_rows_heads * head_dim, 24, generator=g)
        p = tm.permute_qk(w, n_head, kv)
        assert not torch.equal(p, w)
        assert torch.equal(tm.unpermute_qk(p, n_head, kv), w)
        b = torch.randn(n_rows_heads * head_dim, generator=g)
        assert torch.equal(tm.unpermute_qk(tm.permute_qk(b, n_head, kv), n_head, kv), b)
    npw = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
    assert np.array_equal(tm.unpermute_qk(tm.permute_qk(npw, 4, 4), 4, 4), npw)
    # row order within one head of 4 dims: HF (0, 1 | 2, 3) rotate-half pairs (0,2), (1,3) -> GGML 0, 2, 1, 3
    assert tm.permute_qk(torch.arange(4.0), 1, 1).tolist() == [0.0, 2.0, 1.0, 3.0]


def test_permutation_maps_rotate_half_rope_to_interleaved_rope():
    """Independent check of the convention: HF applies RoPE to (i, i + d/2) pairs ("rotate half"), GGML's
    normal RoPE to adjacent (2i, 2i+1) pairs. With llama.cpp's row permutation, GGML-style RoPE of the
    permuted projection must equal the row-permuted HF-style RoPE of the original one, so q.k is unchanged."""
    g = torch.Generator().manual_seed(0)
    n_head, n_kv, d, cols = 4, 2, 16, 32
    wq = torch.randn(n_head * d, cols, generator=g, dtype=torch.float64)
    wk = torch.randn(n_kv * d, cols, generator=g, dtype=torch.float64)
    x = torch.randn(5, cols, generator=g, dtype=torch.float64)
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * theta  # [5, d/2]
    cos, sin = ang.cos(), ang.sin()

    def rope_half(v):  # [5, heads*d]
        v = v.reshape(5, -1, d)
        a, b = v[..., : d // 2], v[..., d // 2 :]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s, b * c + a * s], -1).reshape(5, -1)

    def rope_interleaved(v):
        v = v.reshape(5, -1, d // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, s = cos[:, None], sin[:, None]
        return torch.stack([a * c - b * s, b * c + a * s], -1).reshape(5, -1)

    q_hf, k_hf = rope_half(x @ wq.T), rope_half(x @ wk.T)
    q_gg = rope_interleaved(x @ tm.permute_qk(wq, n_head, n_head).T)
    k_gg = rope_interleaved(x @ tm.permute_qk(wk, n_head, n_kv).T)
    torch.testing.assert_close(q_gg, tm.permute_qk(q_hf.T, n_head, n_head).T)
    torch.testing.assert_close(k_gg, tm.permute_qk(k_hf.T, n_head, n_kv).T)
    # attention scores per (q head, its kv head) are identical
    rep = n_head // n_kv
    s_hf = torch.einsum("qhd,khd->hqk", q_hf.reshape(5, n_head, d), k_hf.reshape(5, n_kv, d).repeat_interleave(rep, 1))
    s_gg = torch.einsum("qhd,khd->hqk", q_gg.reshape(5, n_head, d), k_gg.reshape(5, n_kv, d).repeat_interleave(rep, 1))
    torch.testing.assert_close(s_gg, s_hf)


# ---------------------------------------------------------------------------------------------- GGUF


_HF_CASES = [
    ("llama", {}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": tm.LLAMA3_ROPE_SCALING}),
    ("llama", {"dtype": torch.bfloat16}),
]


@pytest.mark.parametrize(("arch", "kw"), _HF_CASES, ids=[f"{a}-{'-'.join(k) or 'base'}" for a, k in _HF_CASES])
def test_f32_gguf_reference_state_dict_is_exact(tiny_models, arch, kw):
    g = tiny_models.gguf(arch, "F32", **kw)
    ref = tm.gguf_reference_state_dict(g, arch)
    hf = tm.read_hf_state_dict(tiny_models.hf(arch, **kw))
    if kw.get("tie_word_embeddings"):
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    assert ref.keys() == hf.keys()
    for k in hf:
        assert torch.equal(ref[k], hf[k]), k
    # and the raw file content really is permuted for arch llama (not for qwen)
    raw = tm.gguf_tensors_fp32(g)
    q_raw, q_hf = raw["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q_raw, q_hf) == (arch.startswith("qwen"))


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_metadata(tiny_models, arch):
    g = tiny_models.gguf(arch, "F32")
    meta = tm.gguf_metadata(g)
    ga = tm.GGUF_ARCH[arch]
    assert meta["general.architecture"] == ga
    cfg = json.loads((tiny_models.hf(arch) / "config.json").read_text())
    expect = {
        f"{ga}.context_length": 256,
        f"{ga}.embedding_length": 64,
        f"{ga}.feed_forward_length": 128,
        f"{ga}.block_count": 2,
        f"{ga}.attention.head_count": 4,
        f"{ga}.attention.head_count_kv": 2,
        f"{ga}.rope.dimension_count": cfg["head_dim"],
        f"{ga}.vocab_size": cfg["vocab_size"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": tm.BOS_ID,
        "tokenizer.ggml.eos_token_id": tm.EOS_ID,
        "tokenizer.ggml.padding_token_id": tm.PAD_ID,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tm.CHAT_TEMPLATE,
    }
    for k, v in expect.items():
        assert meta[k] == v, k
    assert meta[f"{ga}.rope.freq_base"] == pytest.approx(10000.0)
    assert meta[f"{ga}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert (f"{ga}.attention.key_length" in meta) == (arch == "qwen3")
    if arch == "qwen3":
        assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == 32
    tj = json.loads((tiny_models.hf(arch) / "tokenizer.json").read_text())
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg["vocab_size"]
    assert all(tokens[i] == t for t, i in tj["model"]["vocab"].items())
    assert tokens[:3] == tm.SPECIAL_TOKENS
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert set(meta["tokenizer.ggml.token_type"][3:]) == {1}
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in tj["model"]["merges"]]

    r = gguf.GGUFReader(str(g))
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (arch == "qwen3")
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert list(emb.shape) == [64, cfg["vocab_size"]]  # GGML order: ne0 = in-features


def test_gguf_tied_has_no_output_and_llama3_has_rope_freqs(tiny_models):
    tied = gguf.GGUFReader(str(tiny_models.gguf("llama", tie_word_embeddings=True)))
    assert "output.weight" not in {t.name for t in tied.tensors}
    g = tiny_models.gguf("llama", rope_scaling=tm.LLAMA3_ROPE_SCALING)
    factors = tm.gguf_tensors_fp32(g)["rope_freqs.weight"]
    assert factors.shape == (8,)
    # llama.cpp divides the base frequency by the factor: that must reproduce HF's llama3 inv_freq
    model = tiny_models.hf_reference("llama", rope_scaling=tm.LLAMA3_ROPE_SCALING)
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    torch.testing.assert_close(base / factors, model.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)
    assert factors[0] == 1.0 and factors[-1] == 8.0


# max |w_gguf - w_hf| allowed, for weights ~ N(0, 0.08) (about 0.35 max)
_QUANT_TOL = {"F16": 2e-4, "BF16": 2e-3, "Q8_0": 3e-3, "Q5_1": 2e-2, "Q5_0": 3e-2, "Q4_1": 4e-2, "Q4_0": 6e-2}


@pytest.mark.parametrize("typ", list(_QUANT_TOL))
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_quantized_gguf_close_to_hf(tiny_models, arch, typ):
    g = tiny_models.gguf(arch, typ)
    types = tm.gguf_tensor_types(g)
    for name, t in types.items():
        assert t == ("F32" if "norm" in name or name.endswith(".bias") else typ), name
    ref = tm.gguf_reference_state_dict(g)
    hf = tm.read_hf_state_dict(tiny_models.hf(arch))
    for k, v in hf.items():
        diff = (ref[k] - v).abs().max().item()
        assert diff <= _QUANT_TOL[typ], (k, diff)
        if "norm" not in k:
            assert diff > 0, k  # it really was quantized


def test_embed_output_types_and_overrides(tiny_models):
    g = tiny_models.gguf("qwen2", "Q4_0", embed_type="Q8_0", output_type="F16", overrides={"attn_v": "Q5_1"})
    types = tm.gguf_tensor_types(g)
    assert types["token_embd.weight"] == "Q8_0"
    assert types["output.weight"] == "F16"
    assert types["blk.1.attn_v.weight"] == "Q5_1"
    assert types["blk.1.attn_output.weight"] == "Q4_0"
    assert types["blk.1.attn_v.bias"] == "F32"


def test_unsupported_type_raises(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="cannot write"):
        tm.make_gguf(tiny_models.hf("llama"), tmp_path / "x.gguf", tensor_type="IQ2_XS")
    with pytest.raises(ValueError):
        tm.make_gguf(tiny_models.hf("llama"), tmp_path / "y.gguf", tensor_type="Q4_K", overrides={"attn_q": "Q2_K"})


# ---------------------------------------------------------------------------------------------- K-quants


@pytest.mark.parametrize(("typ", "tol"), [("Q4_K", 0.08), ("Q5_K", 0.04), ("Q6_K", 0.025)])
def test_kquant_encoder_roundtrip(typ, tol):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 512)) * 0.08).astype(np.float32)
    x[0, :256] = np.abs(x[0, :256]) + 0.3  # all-positive block
    x[1, :256] = 0.0  # all-zero block
    x[2, 256:] *= 20.0  # large values
    q = tm.quantize_kquant(x, typ)
    qtype = gguf.GGMLQuantizationType[typ]
    assert q.dtype == np.uint8 and q.shape == (6, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    y = gguf.quants.dequantize(q, qtype)
    assert y.shape == x.shape and np.isfinite(y).all()
    assert np.array_equal(y[1, :256], np.zeros(256, dtype=np.float32))
    rel = np.abs(y - x).max(axis=-1) / np.abs(x).max(axis=-1).clip(1e-9)
    assert rel.max() < tol, rel


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_kquant_model_gguf(tiny_models, arch):
    kw = {"hidden_size": 256, "intermediate_size": 512}
    if arch == "llama":
        kw["head_dim"] = 64
    g = tiny_models.gguf(arch, "Q4_K", overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}, **kw)
    types = tm.gguf_tensor_types(g)
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q6_K"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    # qwen3's o_proj has 4*32 = 128 input features: not a multiple of 256 -> llama.cpp's Q5_0 fallback
    assert types["blk.0.attn_output.weight"] == ("Q5_0" if arch == "qwen3" else "Q4_K")
    ref = tm.gguf_reference_state_dict(g)
    hf = tm.read_hf_state_dict(tiny_models.hf(arch, **kw))
    for k, v in hf.items():
        assert (ref[k] - v).abs().max().item() < 0.06, k


def test_kquant_tensor_file(tmp_path):
    p = tm.make_gguf_kquant_tensor_file(tmp_path / "k.gguf", rows=4, cols=512)
    r = gguf.GGUFReader(str(p))
    assert {t.name: t.tensor_type.name for t in r.tensors} == {f"kquant.{t}": t for t in tm._KQUANT_F16_OFFSETS}
    for name, t in tm.gguf_tensors_fp32(p).items():
        assert t.shape == (4, 512) and torch.isfinite(t).all(), name
        assert t.abs().max() > 0 and t.std() > 0, name


# ------------------------------------------------------------------------------- transformers' GGUF loader


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_transformers_loads_f32_gguf_like_hf(tiny_models, tiny_ids, arch):
    """transformers' own GGUF loader (its own un-permutation code) reproduces the HF logits exactly."""
    from transformers import AutoModelForCausalLM

    g = tiny_models.gguf(arch, "F32")
    m = AutoModelForCausalLM.from_pretrained(
        str(g.parent), gguf_file=g.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    hf = tiny_models.reference_logits(tiny_models.hf(arch), tiny_models.hf_reference(arch), tiny_ids)
    torch.testing.assert_close(tm.reference_logits(m, tiny_ids), hf, rtol=0, atol=1e-5)


_TF_GGUF_CASES = [
    ("qwen3", "F32", {}),
    ("llama", "Q4_0", {}),
    ("mistral", "Q8_0", {}),
    ("qwen2", "Q4_1", {"tie_word_embeddings": True}),
    ("llama", "F16", {"rope_scaling": tm.LLAMA3_ROPE_SCALING}),
    ("qwen3", "Q5_1", {}),
    ("llama", "Q4_K", {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}),
    ("qwen3", "Q6_K", {"hidden_size": 256, "intermediate_size": 512}),
]


@pytest.mark.parametrize(
    ("arch", "typ", "kw"), _TF_GGUF_CASES, ids=[f"{a}-{t}-{'-'.join(k) or 'base'}" for a, t, k in _TF_GGUF_CASES]
)
def test_transformers_gguf_loader_matches_gguf_reference(tiny_models, tiny_ids, arch, typ, kw):
    """Same independent check for quantized files (K-quants included: this also validates the numpy K-quant
    encoder's layout against transformers' loader). transformers' GGUF config mapping ignores
    ``qwen3.attention.key_length`` (it assumes Qwen3's default head_dim 128) and llama3 rope scaling, so for
    those the config comes from the HF folder; the weights still come from the GGUF through transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    g = tiny_models.gguf(arch, typ, **kw)
    extra = {}
    if arch == "qwen3" or "rope_scaling" in kw:
        extra["config"] = AutoConfig.from_pretrained(str(tiny_models.hf(arch, **kw)))
    m = AutoModelForCausalLM.from_pretrained(
        str(g.parent), gguf_file=g.name, dtype=torch.float32, attn_implementation="eager", **extra
    ).eval()
    ref = tm.reference_logits(tiny_models.gguf_reference(arch, typ, **kw), tiny_ids)
    torch.testing.assert_close(tm.reference_logits(m, tiny_ids), ref, rtol=0, atol=1e-5)
    hf = tiny_models.reference_logits(tiny_models.hf(arch, **kw), tiny_models.hf_reference(arch, **kw), tiny_ids)
    if typ != "F32":
        assert (ref - hf).abs().max() > 1e-4  # the GGUF reference really differs from the HF model
