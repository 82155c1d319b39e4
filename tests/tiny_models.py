"""Tiny, deterministic model fixtures for parity tests.

Everything here is built from scratch in well under a second per model, with no network access:

* :func:`make_tokenizer_json` trains a small byte-level BPE (SmolLM2-style special tokens, ChatML template).
* :func:`make_hf_model` random-initialises a 2-layer Llama / Mistral / Qwen2 / Qwen3 with transformers and
  saves it as a Hugging Face folder (safetensors, optionally sharded) together with the tokenizer files.
* :func:`make_gguf` converts such a folder to GGUF v3 following llama.cpp's ``convert_hf_to_gguf.py``
  conventions (tensor names, metadata keys, Q/K row permutation for arch ``llama``, ``rope_freqs`` for
  llama3 rope scaling, ``gpt2`` tokenizer metadata).
* :func:`gguf_reference_state_dict` / :func:`load_gguf_reference` give back exactly the weights a GGUF holds
  (dequantized, un-permuted, with HF names) so a reference transformers model can be compared with an engine
  that loaded the GGUF, quantization error included.

K-quants (Q4_K, Q5_K, Q6_K) cannot be produced by ``gguf.quants.quantize`` (gguf-py only dequantizes them),
so this module carries a small numpy quantizer for them (:func:`quantize_kquant`) whose output is checked
against ``gguf.quants.dequantize`` in ``test_fixtures.py``. :func:`make_gguf_kquant_tensor_file` writes a
loader-level file of random valid K-quant blocks (Q2_K..Q6_K).
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"
BOS_ID, EOS_ID, PAD_ID, UNK_ID = IM_START_ID, IM_END_ID, IM_END_ID, ENDOFTEXT_ID
TOKENIZER_VOCAB_SIZE = 384

# SmolLM2-Instruct's chat template (ChatML with a default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer regexes, as llama.cpp implements each `tokenizer.ggml.pre` (llama-vocab.cpp).
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
LLAMA3_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# tokenizer.ggml.pre values this module can build a matching HF tokenizer for:
#   smollm    = split every digit (\p{N}), then the GPT-2 regex   (SmolLM2, StarCoder)
#   gpt2      = the GPT-2 regex only
#   qwen2     = the Qwen2 regex (single digits)
#   llama-bpe = the Llama-3 regex (digit groups of up to 3), with ignore_merges like Llama 3's tokenizer.json
TOKENIZER_PRES = ("smollm", "gpt2", "qwen2", "llama-bpe")

# Mixed text used to check that an engine tokenizer matches the HF one. Deliberately includes things the
# pre-tokenizers treat differently: digit runs, contractions, runs of spaces/newlines, code, other scripts.
MIXED_TEXT = (
    "Hello world! It's 2024-06-15 and we've got 1234567 tokens, isn't it? I'LL say: 3.14159.\n"
    "def add(a, b):\n    return a + b  # sum\n\n\tx = [1, 22, 333, 4444]\n"
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, emoji 🦙🚀!\n"
    "   multiple   spaces\r\nand CRLF  \n  trailing   "
)


_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if "
    "will up other about out many then them these so some her would make like him into time has look two "
    "more write go see number no way could people my than first water been call who oil its now find long "
    "down day did get come made may part model token language learning inference quantization cache memory"
)


def _corpus_lines(seed: int = 1234) -> list[str]:
    """A few KB of deterministic mixed text: English, digits, code, unicode."""
    rng = random.Random(seed)
    words = _WORDS.split()
    code = [
        "def forward(self, x):\n    return self.proj(x) * 2\n",
        "for i in range(10):\n    print(i, i ** 2)\n",
        "if (a != b && c >= 0) { return -1; }\n",
        "import torch\nimport numpy as np\nx = torch.zeros(4, 8)\n",
        "class Node:\n    def __init__(self, val):\n        self.val = val\n",
        'print(f"{name}: {value:.3f}")  # formatted\n',
        "SELECT id, name FROM users WHERE age > 21;\n",
        "    x += 1\n\ty -= 2\n",
    ]
    uni = [
        "café crème brûlée, naïve façade",
        "Größe Straße Übung Ärger",
        "Ελληνικά γράμματα αβγδ",
        "русский язык привет мир",
        "日本語のテキストです。東京",
        "中文文本，你好世界。",
        "한국어 텍스트 안녕하세요",
        "emoji 🦙🚀✨ and symbols ±×÷≠€£¥",
        "mañana señor, ¿qué tal? ¡olé!",
    ]
    lines: list[str] = []
    for _ in range(60):
        n = rng.randint(5, 14)
        s = " ".join(rng.choice(words) for _ in range(n))
        s = s[0].upper() + s[1:] + rng.choice([".", "!", "?", ",", ":"])
        if rng.random() < 0.3:
            s = s.replace(" is ", " isn't ").replace(" do ", " don't ")
        lines.append(s)
    for _ in range(30):
        lines.append(
            f"{rng.randint(0, 99999)} + {rng.randint(0, 999)} = {rng.random() * 1000:.2f} "
            f"on {rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        )
    for _ in range(3):
        lines.extend(code)
        lines.extend(uni)
    rng.shuffle(lines)
    return lines


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("qwen2", "llama-bpe"):
        regex = QWEN2_REGEX if pre == "qwen2" else LLAMA3_REGEX
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(f"unknown tokenizer pre {pre!r}; expected one of {TOKENIZER_PRES}")


@functools.cache
def tokenizer_json_str(pre: str = "smollm", vocab_size: int = TOKENIZER_VOCAB_SIZE) -> str:
    """Train the tiny BPE (deterministic) and return the serialized tokenizer.json content."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=(pre == "llama-bpe")))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    return tok.to_str(pretty=True)


def tokenizer_config_dict() -> dict:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def make_tokenizer_json(dir: str | Path, *, pre: str = "smollm") -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``dir``; return the tokenizer.json path."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "tokenizer.json"
    path.write_text(tokenizer_json_str(pre), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_dict(), indent=2), encoding="utf-8")
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return path


def load_hf_tokenizer(dir_or_file: str | Path):
    """The reference tokenizer (``tokenizers.Tokenizer``) from a folder or a tokenizer.json path."""
    from tokenizers import Tokenizer

    p = Path(dir_or_file)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


def hf_encode(dir_or_file: str | Path, text: str) -> list[int]:
    """Reference encoding: HF tokenizer, no special tokens added (special markers in text are parsed)."""
    return load_hf_tokenizer(dir_or_file).encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------------------------
# Hugging Face models
# ----------------------------------------------------------------------------------------------------------

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ROPE_THETA = 10000.0
INIT_STD = 0.08


def _arch_classes(arch: str):
    import transformers as tf

    table = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }
    if arch not in table:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return table[arch]


def tiny_config_kwargs(
    arch: str,
    *,
    vocab_size: int = TOKENIZER_VOCAB_SIZE,
    tie_word_embeddings: bool = False,
    rope_scaling: Mapping | None = None,
    **overrides,
) -> dict:
    """Config kwargs (transformers 5 names) for the tiny model of ``arch``."""
    kw: dict = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5 if arch in ("llama", "mistral") else 1e-6,
        hidden_act="silu",
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.02,
    )
    if arch == "qwen3":
        kw["head_dim"] = 32  # != hidden/heads (16): catches engines that derive head_dim from hidden/heads
    if arch == "mistral":
        kw["sliding_window"] = None
    if arch in ("qwen2", "qwen3"):
        kw["use_sliding_window"] = False
    kw.update(overrides)
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA}
    if rope_scaling:
        rope = {"rope_theta": ROPE_THETA, **dict(rope_scaling)}
    kw["rope_parameters"] = rope
    return kw


def _randomize_(model: torch.nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Deterministic init where every tensor matters: norms ~ 1 +- 0.1, biases and matrices ~ N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights are listed once
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(std * noise)


def _legacy_config(cfg: dict) -> dict:
    """Rewrite a transformers-5 config.json in the transformers-4 layout most Hub checkpoints use:
    ``rope_theta`` + ``rope_scaling`` at top level, ``torch_dtype``."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", ROPE_THETA)
    rope_type = rope.get("rope_type", "default")
    cfg["rope_scaling"] = None if rope_type == "default" else rope
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


def make_hf_model(
    dir: str | Path,
    arch: str,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    sharded: bool = False,
    rope_scaling: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
    config_format: str = "legacy",
    tokenizer_pre: str = "smollm",
    std: float = INIT_STD,
    **config_overrides,
) -> Path:
    """Random-init a tiny ``arch`` model and save it (safetensors + config + tokenizer files) into ``dir``.

    ``config_format``: "legacy" rewrites config.json to the transformers-4 layout (``rope_theta`` and
    ``rope_scaling`` keys, like SmolLM2/Llama/Qwen checkpoints on the Hub); "v5" keeps transformers 5's
    ``rope_parameters`` layout. ``config_overrides`` go to the config (e.g. ``hidden_size=256``).
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    make_tokenizer_json(d, pre=tokenizer_pre)
    vocab_size = load_hf_tokenizer(d).get_vocab_size()
    config_cls, model_cls = _arch_classes(arch)
    config = config_cls(
        **tiny_config_kwargs(
            arch,
            vocab_size=vocab_size,
            tie_word_embeddings=tie_word_embeddings,
            rope_scaling=rope_scaling,
            **config_overrides,
        )
    )
    quiet_transformers()
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    _randomize_(model, seed, std)
    if tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model = model.to(dtype).eval()
    if sharded:
        model.save_pretrained(d, max_shard_size="200KB")
        assert (d / "model.safetensors.index.json").exists()
    else:
        model.save_pretrained(d)
    if config_format == "legacy":
        cfg_path = d / "config.json"
        cfg_path.write_text(json.dumps(_legacy_config(json.loads(cfg_path.read_text())), indent=2))
    elif config_format != "v5":
        raise ValueError(f"config_format must be 'legacy' or 'v5', not {config_format!r}")
    return d


def quiet_transformers() -> None:
    """No progress bars / load reports from transformers (they flood test output)."""
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()


def load_hf_reference(dir: str | Path):
    """The transformers model of a tiny HF folder, in fp32 eval mode with eager attention."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()

    model = AutoModelForCausalLM.from_pretrained(str(dir), dtype=torch.float32, attn_implementation="eager")
    return model.float().eval()


@torch.no_grad()
def reference_logits(model, ids: Sequence[int]) -> torch.Tensor:
    """Teacher-forced next-token logits ``[len(ids), vocab]`` (fp32) of a transformers model."""
    out = model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


def sample_ids(n: int = 40, *, vocab_size: int = TOKENIZER_VOCAB_SIZE, seed: int = 0) -> list[int]:
    """``n`` token ids: a real encoding of mixed text, topped up with random non-special ids."""
    ids = hf_encode_str(tokenizer_json_str("smollm"), MIXED_TEXT)[: n // 2]
    rng = random.Random(seed)
    ids += [rng.randrange(len(SPECIAL_TOKENS), vocab_size) for _ in range(n - len(ids))]
    return ids


def hf_encode_str(tokenizer_json: str, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------------------

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PYTHON_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # via gguf.quants
KQUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K")  # via quantize_kquant below
GGUF_WRITABLE_TYPES = PYTHON_QUANT_TYPES + KQUANT_TYPES
# llama.cpp's fallbacks when a row is not a multiple of 256 (llama-quant.cpp)
KQUANT_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_FILE_TYPE = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
}

# HF tensor name (with {bid}) -> GGUF name
_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}


def _name_maps(n_layers: int) -> tuple[dict[str, str], dict[str, str]]:
    h2g: dict[str, str] = {}
    for hf, gg in _HF_TO_GGUF.items():
        if "{bid}" in hf:
            for b in range(n_layers):
                h2g[hf.format(bid=b)] = gg.format(bid=b)
        else:
            h2g[hf] = gg
    return h2g, {g: h for h, g in h2g.items()}


def hf_to_gguf_name(name: str, n_layers: int) -> str:
    return _name_maps(n_layers)[0][name]


def gguf_to_hf_name(name: str, n_layers: int) -> str:
    return _name_maps(n_layers)[1][name]


def permute_qk(w: np.ndarray | torch.Tensor, n_head: int, n_head_kv: int | None = None):
    """llama.cpp ``LlamaModel.permute``: HF's rotate-half Q/K row order -> GGML's interleaved pair order.

    Exactly ``convert_hf_to_gguf.py``: for K pass ``(n_head, n_head_kv)``, for Q ``(n_head, n_head)``.
    Works for weights ``[rows, cols]`` and biases ``[rows]``.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(w: np.ndarray | torch.Tensor, n_head: int, n_head_kv: int | None = None):
    """Inverse of :func:`permute_qk` (GGML interleaved rows -> HF rotate-half rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def read_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors HF folder, upcast to fp32 (exact for f16/bf16)."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        sd.update({k: v.float() for k, v in load_file(str(f)).items()})
    return sd


def _load_config(hf_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(hf_dir))


def _rope_params(config) -> dict:
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        return dict(rp)
    rs = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", ROPE_THETA), **rs}


def llama3_rope_factors(config) -> torch.Tensor:
    """The per-dimension ``rope_freqs.weight`` llama.cpp writes for llama3 rope scaling (head_dim/2 values).

    Follows ``LlamaModel.generate_extra_tensors`` in convert_hf_to_gguf.py, except that
    ``original_max_position_embeddings`` is read from the rope-scaling dict (where HF reads it) rather than
    from the config top level: llama.cpp's converter looks at the top level and falls back to 8192, which is
    the same number for real Llama 3.x checkpoints but would silently differ for this tiny model's 64.
    """
    rp = _rope_params(config)
    base = float(rp.get("rope_theta", ROPE_THETA))
    dim = config.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    low_freq_factor = rp.get("low_freq_factor", 1.0)
    high_freq_factor = rp.get("high_freq_factor", 4.0)
    old_context_len = rp.get(
        "original_max_position_embeddings", getattr(config, "original_max_position_embeddings", 8192)
    )
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _qtype(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def encode_tensor(data: np.ndarray, type_name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """Encode a float array as ``type_name``; returns (array for GGUFWriter.add_tensor, raw_dtype or None)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if type_name == "F32":
        return data, None
    if type_name == "F16":
        return data.astype(np.float16), None
    if type_name in KQUANT_TYPES:
        return quantize_kquant(data, type_name), _qtype(type_name)
    if type_name in PYTHON_QUANT_TYPES:
        return gguf.quants.quantize(data, _qtype(type_name)), _qtype(type_name)
    raise ValueError(f"cannot write tensor type {type_name!r}; writable: {GGUF_WRITABLE_TYPES}")


def _choose_type(
    gguf_name: str,
    shape: tuple[int, ...],
    tensor_type: str,
    embed_type: str | None,
    output_type: str | None,
    overrides: Mapping[str, str] | None,
) -> str:
    if len(shape) < 2:
        return "F32"  # norms, biases, rope_freqs
    t = tensor_type
    if gguf_name == "token_embd.weight" and embed_type is not None:
        t = embed_type
    if gguf_name == "output.weight" and output_type is not None:
        t = output_type
    segments = gguf_name.split(".")
    for key, typ in (overrides or {}).items():
        if key == gguf_name or key in segments:
            t = typ
    if t in KQUANT_TYPES and shape[-1] % 256 != 0:
        t = KQUANT_FALLBACK[t]
    if t not in ("F32", "F16", "BF16"):
        block = gguf.GGML_QUANT_SIZES[_qtype(t)][0]
        if shape[-1] % block != 0:
            raise ValueError(f"{gguf_name}: row length {shape[-1]} is not a multiple of {t}'s block {block}")
    return t


def _tokenizer_metadata(hf_dir: Path) -> dict:
    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    assert all(tokens), "vocab ids must be contiguous"
    # llama.cpp get_vocab_base: added special tokens -> CONTROL, other added -> USER_DEFINED, rest NORMAL
    types = []
    for t in tokens:
        if t in added:
            types.append(gguf.TokenType.CONTROL if added[t]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))

    def tok_id(key: str) -> int | None:
        v = tcfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return vocab.get(v) if v is not None else None

    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tok_id("bos_token"),
        "eos": tok_id("eos_token"),
        "pad": tok_id("pad_token"),
        "unk": tok_id("unk_token"),
        "add_bos": bool(tcfg.get("add_bos_token", False)),
        "add_eos": bool(tcfg.get("add_eos_token", False)),
        "chat_template": tcfg.get("chat_template"),
    }


def make_gguf(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    tensor_type: str = "F32",
    embed_type: str | None = None,
    output_type: str | None = None,
    overrides: Mapping[str, str] | None = None,
    tokenizer_pre: str = "smollm",
    write_head_dim_keys: bool | None = None,
) -> Path:
    """Convert a tiny HF folder to a GGUF v3 file the way llama.cpp's convert_hf_to_gguf.py would.

    ``tensor_type``: type of the 2-D weight matrices (norms/biases stay F32), one of GGUF_WRITABLE_TYPES.
    ``embed_type`` / ``output_type``: override for ``token_embd.weight`` / ``output.weight``.
    ``overrides``: {GGUF tensor name or one dot-separated part of it: type}, e.g.
    ``{"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}`` for a Q4_K_M-like mix.
    K-quant rows not a multiple of 256 fall back like llama.cpp (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0).
    ``tokenizer_pre``: the ``tokenizer.ggml.pre`` value to write (it should match the pre-tokenizer the HF
    folder was built with). ``write_head_dim_keys``: write ``attention.key_length/value_length``;
    default: only when head_dim != hidden/heads.
    """
    for typ in (tensor_type, embed_type, output_type, *(overrides or {}).values()):
        if typ is not None and typ not in GGUF_WRITABLE_TYPES:
            raise ValueError(f"cannot write tensor type {typ!r}; writable: {GGUF_WRITABLE_TYPES}")
    hf_dir = Path(hf_dir)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    config = _load_config(hf_dir)
    hf_arch = config.model_type
    if hf_arch not in GGUF_ARCH:
        raise ValueError(f"unsupported model_type {hf_arch!r}")
    arch = GGUF_ARCH[hf_arch]
    n_layers = config.num_hidden_layers
    n_head = config.num_attention_heads
    n_head_kv = config.num_key_value_heads
    head_dim = config.head_dim
    sd = read_hf_state_dict(hf_dir)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # llama.cpp writes no output.weight for tied embeddings

    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_type("model")
    w.add_name(f"tiny-{hf_arch}")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(n_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if write_head_dim_keys or (write_head_dim_keys is None and head_dim != config.hidden_size // n_head):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rp = _rope_params(config)
    w.add_rope_freq_base(float(rp.get("rope_theta", ROPE_THETA)))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(_FILE_TYPE[tensor_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tm = _tokenizer_metadata(hf_dir)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre)
    w.add_token_list(tm["tokens"])
    w.add_token_types(tm["types"])
    w.add_token_merges(tm["merges"])
    for key, fn in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("unk", w.add_unk_token_id),
        ("pad", w.add_pad_token_id),
    ):
        if tm[key] is not None:
            fn(tm[key])
    w.add_add_bos_token(tm["add_bos"])
    w.add_add_eos_token(tm["add_eos"])
    if tm["chat_template"]:
        w.add_chat_template(tm["chat_template"])

    tensors: list[tuple[str, np.ndarray]] = []
    if rp.get("rope_type") == "llama3":
        tensors.append(("rope_freqs.weight", llama3_rope_factors(config).numpy()))
    h2g, _ = _name_maps(n_layers)
    for name in sorted(sd, key=_hf_order_key):
        t = sd[name]
        if arch == "llama":
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_qk(t, n_head, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute_qk(t, n_head, n_head_kv)
        if name not in h2g:
            raise KeyError(f"no GGUF name for HF tensor {name!r}")
        tensors.append((h2g[name], t.contiguous().numpy()))

    for gname, data in tensors:
        typ = _choose_type(gname, data.shape, tensor_type, embed_type, output_type, overrides)
        arr, raw_dtype = encode_tensor(data, typ)
        w.add_tensor(gname, arr, raw_dtype=raw_dtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _hf_order_key(name: str):
    # llama.cpp order: token_embd, blocks in order, then output_norm/output (order only matters cosmetically)
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (2, 0, name)


def gguf_metadata(gguf_path: str | Path) -> dict:
    """Scalar/string/array KV metadata of a GGUF as plain Python values (arrays of strings decoded)."""
    r = gguf.GGUFReader(str(gguf_path))
    out = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = field.contents()
    return out


def gguf_tensors_fp32(gguf_path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF, dequantized with ``gguf.quants.dequantize`` to fp32, with GGUF names and
    numpy-order shapes (``[rows, cols]`` = ``[out_features, in_features]``)."""
    r = gguf.GGUFReader(str(gguf_path))
    out = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))  # t.shape is GGML order (ne0 first)
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
    return out


def gguf_tensor_types(gguf_path: str | Path) -> dict[str, str]:
    r = gguf.GGUFReader(str(gguf_path))
    return {t.name: t.tensor_type.name for t in r.tensors}


def gguf_reference_state_dict(gguf_path: str | Path, arch: str | None = None) -> dict[str, torch.Tensor]:
    """HF-named fp32 weights equal to what the GGUF stores: dequantized, Q/K un-permuted for arch llama.

    ``arch`` may be the HF arch (llama/mistral/qwen2/qwen3) or the GGUF one; default: the file's
    ``general.architecture``. ``rope_freqs.weight`` is not an HF weight and is left out. For tied models
    (no ``output.weight``) ``lm_head.weight`` is the dequantized embedding, as an engine would tie it.
    """
    meta = gguf_metadata(gguf_path)
    file_arch = meta["general.architecture"]
    arch = GGUF_ARCH.get(arch, arch) if arch is not None else file_arch
    n_layers = int(meta[f"{file_arch}.block_count"])
    n_head = int(meta[f"{file_arch}.attention.head_count"])
    n_head_kv = int(meta.get(f"{file_arch}.attention.head_count_kv", n_head))
    _, g2h = _name_maps(n_layers)
    sd: dict[str, torch.Tensor] = {}
    for gname, t in gguf_tensors_fp32(gguf_path).items():
        if gname == "rope_freqs.weight":
            continue
        hname = g2h[gname]
        if arch == "llama":
            if gname.endswith(("attn_q.weight", "attn_q.bias")):
                t = unpermute_qk(t, n_head, n_head)
            elif gname.endswith(("attn_k.weight", "attn_k.bias")):
                t = unpermute_qk(t, n_head, n_head_kv)
        sd[hname] = t.contiguous()
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def load_gguf_reference(hf_dir: str | Path, gguf_path: str | Path):
    """The transformers model of ``hf_dir`` (fp32, eager) with exactly the weights ``gguf_path`` holds."""
    model = load_hf_reference(hf_dir)
    sd = gguf_reference_state_dict(gguf_path, model.config.model_type)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF reference weights mismatch: missing={missing} unexpected={unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def make_model(
    root: str | Path,
    arch: str,
    fmt: str = "hf",
    *,
    gguf_type: str = "F32",
    **hf_kwargs,
) -> tuple[Path, Path]:
    """Convenience: build ``root/hf`` (+ ``root/model.gguf`` when ``fmt == "gguf"``).

    Returns ``(model_path, hf_dir)`` where model_path is what an engine should load: the HF folder or the
    GGUF file. ``fmt``: "hf" | "hf-sharded" | "gguf".
    """
    root = Path(root)
    if fmt == "hf-sharded":
        hf_kwargs["sharded"] = True
    hf_dir = make_hf_model(root / "hf", arch, **hf_kwargs)
    if fmt in ("hf", "hf-sharded"):
        return hf_dir, hf_dir
    if fmt == "gguf":
        g = make_gguf(
            hf_dir,
            root / f"tiny-{arch}-{gguf_type}.gguf",
            tensor_type=gguf_type,
            tokenizer_pre=hf_kwargs.get("tokenizer_pre", "smollm"),
        )
        return g, hf_dir
    raise ValueError(f"unknown fmt {fmt!r}")


# ----------------------------------------------------------------------------------------------------------
# K-quants (numpy encoders; gguf-py only has decoders for them)
# ----------------------------------------------------------------------------------------------------------

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    return np.round(x).astype(np.int32)


def _pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 6-bit scales and 8 6-bit mins per block into 12 bytes (inverse of gguf Q4_K.get_scale_min)."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _affine_k(blocks: np.ndarray, nmax: int):
    """Shared Q4_K/Q5_K encoder: 8 sub-blocks of 32 with value = d*sc*q - dmin*m, q in [0, nmax]."""
    nb = blocks.shape[0]
    x = blocks.reshape(nb, 8, 32)
    mn = np.minimum(x.min(axis=-1), 0.0)
    mx = x.max(axis=-1)
    scale = (mx - mn) / nmax
    minv = -mn
    d = _f16(scale.max(axis=-1) / 63.0)
    dmin = _f16(minv.max(axis=-1) / 63.0)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df[:, None] > 0, _nearest_int(scale / df[:, None]), 0)
        m = np.where(dminf[:, None] > 0, _nearest_int(minv / dminf[:, None]), 0)
    sc = np.clip(sc, 0, 63)
    m = np.clip(m, 0, 63)
    eff_s = df[:, None] * sc
    eff_m = dminf[:, None] * m
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(eff_s[..., None] > 0, _nearest_int((x + eff_m[..., None]) / eff_s[..., None]), 0)
    q = np.clip(q, 0, nmax).astype(np.uint8)
    return d, dmin, sc, m, q


def _quantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d, dmin, sc, m, q = _affine_k(blocks, 15)
    qg = q.reshape(nb, 4, 2, 32)
    qs = (qg[:, :, 0, :] | (qg[:, :, 1, :] << 4)).reshape(nb, 128)
    return np.concatenate(
        [d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8), _pack_scale_min_k4(sc, m), qs],
        axis=1,
    )


def _quantize_q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d, dmin, sc, m, q = _affine_k(blocks, 31)
    lo = (q & 0x0F).reshape(nb, 4, 2, 32)
    qs = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(nb, 128)
    hi = (q >> 4).astype(np.uint8)  # (nb, 8, 32): bit j of qh[l] is the high bit of sub-block j, element l
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for j in range(8):
        qh |= hi[:, j, :] << j
    return np.concatenate(
        [
            d.reshape(nb, 1).view(np.uint8),
            dmin.reshape(nb, 1).view(np.uint8),
            _pack_scale_min_k4(sc, m),
            qh,
            qs,
        ],
        axis=1,
    )


def _quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    x = blocks.reshape(nb, 16, 16)
    amax_idx = np.abs(x).argmax(axis=-1)
    vmax = np.take_along_axis(x, amax_idx[..., None], axis=-1)[..., 0]  # signed value of largest magnitude
    scale = vmax / -32.0  # like llama.cpp's make_qx_quants(nmax=32): the extreme maps to -32
    amax_scale = np.abs(scale).max(axis=-1)
    iscale_idx = np.abs(scale).argmax(axis=-1)
    max_scale = np.take_along_axis(scale, iscale_idx[..., None], axis=-1)[..., 0]
    d = _f16(np.where(amax_scale > 0, max_scale / -128.0, 0.0))
    df = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df[:, None] != 0, _nearest_int(scale / df[:, None]), 0)
    sc = np.clip(sc, -128, 127)
    eff = df[:, None] * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(eff[..., None] != 0, _nearest_int(x / eff[..., None]), 0)
    u = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 128)  # per half h: positions h*128 + ...
    lo = (u & 0x0F).reshape(nb, 2, 2, 64)  # [h, k, l] -> ql[h*64 + l] nibble k
    ql = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(nb, 128)
    hi = (u >> 4).reshape(nb, 2, 4, 32)  # [h, s, m] -> qh[h*32 + m] bits 2s..2s+1
    qh = (hi[:, :, 0, :] | (hi[:, :, 1, :] << 2) | (hi[:, :, 2, :] << 4) | (hi[:, :, 3, :] << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d.reshape(nb, 1).view(np.uint8)], axis=1)


_KQUANT_ENCODERS = {
    "Q4_K": _quantize_q4_k_blocks,
    "Q5_K": _quantize_q5_k_blocks,
    "Q6_K": _quantize_q6_k_blocks,
}


def quantize_kquant(data: np.ndarray, type_name: str) -> np.ndarray:
    """Encode ``data`` (rows a multiple of 256) as Q4_K / Q5_K / Q6_K bytes, shaped like gguf.quants.quantize
    output (``[..., row_bytes]`` uint8). Simple round-to-nearest encoder (not llama.cpp's optimised search):
    the bit layout is what matters, and the reference model uses the dequantized values anyway."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.shape[-1] % QK_K != 0:
        raise ValueError(f"row length {data.shape[-1]} is not a multiple of {QK_K}")
    qtype = _qtype(type_name)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(-1, QK_K)
    out = _KQUANT_ENCODERS[type_name](blocks)
    assert out.dtype == np.uint8 and out.shape == (blocks.shape[0], type_size), (out.dtype, out.shape)
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * type_size)


# Offsets of the fp16 super-block scales inside each K-quant block (the rest may be arbitrary bytes).
_KQUANT_F16_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def make_gguf_kquant_tensor_file(
    out_path: str | Path,
    types: Sequence[str] = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
    *,
    rows: int = 8,
    cols: int = 512,
    seed: int = 0,
) -> Path:
    """A loader-level GGUF holding one ``[rows, cols]`` tensor per K-quant type, named ``kquant.<TYPE>``,
    built from random valid block bytes (random quants/scales, small finite fp16 super-scales). Compare an
    engine's dequantization with :func:`gguf_tensors_fp32` of the same file."""
    if cols % QK_K:
        raise ValueError("cols must be a multiple of 256")
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_type("model")
    w.add_name("kquant-tensors")
    for typ in types:
        qtype = _qtype(typ)
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nblocks = rows * cols // QK_K
        blocks = rng.integers(0, 256, size=(nblocks, type_size), dtype=np.uint8)
        for off in _KQUANT_F16_OFFSETS[typ]:
            vals = rng.uniform(-0.02, 0.02, size=nblocks).astype(np.float16)
            if typ in ("Q4_K", "Q5_K", "Q2_K"):
                vals = np.abs(vals)  # d / dmin are non-negative in real files
            blocks[:, off : off + 2] = vals.reshape(-1, 1).view(np.uint8)
        data = blocks.reshape(rows, cols // QK_K * type_size)
        w.add_tensor(f"kquant.{typ}", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out_path)
