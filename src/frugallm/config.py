"""Model configuration: one frozen dataclass for every supported Llama-family architecture.

Built from GGUF metadata (``loading/gguf.py``) or a Hugging Face ``config.json``
(``loading/hf.py``); never guessed from file names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from frugallm.errors import ModelLoadError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")

# Upper bounds far above any released model (largest: ~126 layers, 256k vocab, 10M context), checked before
# anything is allocated: a corrupt or hostile header must not build 1e9 layers or a 2^40-position RoPE table.
LIMITS = {
    "vocab_size": 2**22,
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "num_layers": 1024,
    "num_heads": 4096,
    "num_kv_heads": 4096,
    "head_dim": 4096,
    "max_position_embeddings": 2**24,
}


def as_int(v: Any, name: str) -> int:
    """``v`` as an int: ints, integral floats (``1e3``) and numeric strings; anything else names the field."""
    try:
        if isinstance(v, bool):
            raise TypeError
        f = float(v)
        if f != f or f in (float("inf"), float("-inf")) or f != int(f):
            raise ValueError
        return int(v) if isinstance(v, int) else int(f)
    except (TypeError, ValueError, OverflowError):
        raise ModelLoadError(f"model config: {name} must be an integer, got {v!r}"[:200]) from None


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type == "llama3"``) or linear scaling."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ModelLoadError(f"unsupported rope scaling type {self.rope_type!r}; supported: llama3, linear")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: bias on q/k/v projections
    qk_norm: bool = False  # qwen3: RMSNorm on each head of q and k
    sliding_window: int | None = None  # mistral; recorded, full attention is used within context
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        for name, limit in LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ModelLoadError(f"model config: {name} must be an integer, got {v!r}")
            if not 0 < v <= limit:
                raise ModelLoadError(
                    f"model config: {name} is {v}, outside [1, {limit}]; the model file or config.json is corrupt"
                )
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not 0 < v < float("inf"):
                raise ModelLoadError(f"model config: {name} must be a positive finite number, got {v!r}")
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    # Derived sizes, used by the model, the KV cache and the roofline model.
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count (embedding and LM head counted once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + embed + head + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ModelLoadError(f"model config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        try:
            if d.get("rope_scaling") is not None:
                d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
            return cls(**d)
        except TypeError as e:  # unknown or missing fields
            raise ModelLoadError(f"model config: {e}") from None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict."""
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"config.json must be a JSON object, got {type(cfg).__name__}")
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_ARCHS:
            archs = cfg.get("architectures") or []
            raise ModelLoadError(f"unsupported architecture {mt or archs!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        try:
            hidden = as_int(cfg["hidden_size"], "hidden_size")
            heads = as_int(cfg["num_attention_heads"], "num_attention_heads")
            rs = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or None)
            rope_theta = float(cfg.get("rope_theta") or (rs or {}).get("rope_theta") or 10000.0)
            scaling = None
            if rs and rs.get("rope_type", rs.get("type")) in ("llama3", "linear"):
                kind = rs.get("rope_type", rs.get("type"))
                scaling = RopeScaling(
                    rope_type=kind,
                    factor=float(rs.get("factor", 1.0)),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
                )
            return cls(
                arch=mt,
                vocab_size=as_int(cfg["vocab_size"], "vocab_size"),
                hidden_size=hidden,
                intermediate_size=as_int(cfg["intermediate_size"], "intermediate_size"),
                num_layers=as_int(cfg["num_hidden_layers"], "num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=as_int(cfg.get("num_key_value_heads") or heads, "num_key_value_heads"),
                head_dim=as_int(cfg.get("head_dim") or (hidden // heads if heads > 0 else 0), "head_dim"),
                max_position_embeddings=as_int(cfg.get("max_position_embeddings", 2048), "max_position_embeddings"),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", mt == "qwen2")),
                qk_norm=mt == "qwen3",
                sliding_window=cfg.get("sliding_window") if mt == "mistral" else None,
                name=str(cfg.get("_name_or_path", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"config.json is missing or has an invalid field: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` transformers would write for this model: :meth:`from_hf` reads it back
        equal, and other tools (``frugallm info``, transformers' config loader) can read it."""
        names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
        return {
            "architectures": [f"{names[self.arch]}ForCausalLM"],
            "model_type": self.arch,
            "_name_or_path": self.name,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else asdict(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "sliding_window": self.sliding_window,
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        """A Hugging Face ``config.json`` or a frugallm config dump (``to_dict``)."""
        d = read_json(path, "model config")
        if isinstance(d, dict) and "arch" in d:
            return cls.from_dict(d)
        return cls.from_hf(d)


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; unreadable, undecodable, invalid or absurdly nested files are a ModelLoadError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {what} {path}: {e}") from None
    except RecursionError:
        raise ModelLoadError(f"cannot read {what} {path}: JSON nested too deeply") from None
