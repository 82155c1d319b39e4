"""What the three format loaders share: the description of a model, the loaded result, and the one
meta-device build that turns a state dict into a :class:`Transformer`.

Kept apart from ``loading/__init__.py`` so the format modules (``gguf.py``, ``hf.py``, ``quantized.py``)
import it without importing the dispatcher that imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.errors import ModelLoadError
from frugallm.model.llama import Transformer
from frugallm.tokenizer.tokenizer import Tokenizer

ModelFormat = Literal["gguf", "hf", "quantized"]
# How quantized weights load: run as stored in the file (GGUF on CPU), as stored with int8 activations in decode
# (llama.cpp's arithmetic, not exact), or dequantized to the engine dtype.
WeightsMode = Literal["stored", "stored-q8", "dequantize"]
STORED_MODES = ("stored", "stored-q8")  # the modes that keep a GGUF's blocks (fp32 model, GGUFLinear)


@dataclass(frozen=True, eq=False)
class ModelDescription:
    """A model read from its metadata only (no weights): what ``frugallm info`` shows and what a loader
    starts from. Built by :func:`frugallm.loading.describe`, the one place that tells formats apart.

    ``tensor_bytes`` maps each stored tensor type (GGML type such as ``Q4_1``, or safetensors dtype such
    as ``BF16`` / ``U8``) to its bytes on disk. ``source_info`` is what :attr:`LoadedModel.source_info`
    reports for this format. The tokenizer is built on first use: a GGUF vocabulary takes a while to
    build, and ``info`` or a config lookup never needs it.
    """

    format: ModelFormat
    path: Path
    config: ModelConfig
    tensor_bytes: Mapping[str, int]
    chat_template: bool
    source_info: Mapping[str, Any]
    make_tokenizer: Callable[[], Tokenizer] = field(repr=False)
    # The opened source (GGUF reader, HF folder index, quantized metadata) so loading reads it once.
    handle: Any = field(default=None, repr=False)
    _tokenizer: list[Tokenizer] = field(default_factory=list, repr=False, init=False)

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, built once per description."""
        if not self._tokenizer:
            self._tokenizer.append(self.make_tokenizer())
        return self._tokenizer[0]


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    source_format: str  # "gguf" | "hf" | "quantized"
    from_cache: bool
    load_seconds: float
    source_info: dict[str, Any]


def materialize(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    device: torch.device,
    *,
    where: str,
    install: Callable[[Transformer], Iterable[str]] | None = None,
) -> Transformer:
    """Build the model on the meta device and assign ``state`` (no copy, no random init).

    ``install(model)`` may first put prebuilt modules in place (the quantized loader's packed linears)
    and returns their paths: parameters under them are not expected in ``state``. A ``rope_factors``
    entry becomes the model's RoPE frequency factors. Any mismatch raises :class:`ModelLoadError`
    prefixed with ``where`` (the file or folder).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    installed = tuple(f"{p}." for p in (install(model) if install is not None else ()))
    rope_factors = state.pop("rope_factors", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ModelLoadError(f"{where}: weights do not match the model config: {e}") from None
    missing = [k for k in missing if not k.startswith(installed)] if installed else list(missing)
    # A quantized embedding / head carries its own sharing; only plain modules are tied here.
    plain_head = isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    if cfg.tie_word_embeddings and plain_head:
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ModelLoadError(
            f"{where}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t is not None and t.is_meta]
    if leftover:
        raise ModelLoadError(f"{where}: no stored values for {leftover[:5]}")
    if rope_factors is not None:
        model.rope_factors = rope_factors.float()
    model = model.to(device)
    model.eval().requires_grad_(False)
    return model


def check_vocab(cfg: ModelConfig, tok: Tokenizer, path: Path) -> None:
    """A tokenizer larger than the embedding table would index past it at the first rare token."""
    if tok.vocab_size > cfg.vocab_size:
        raise ModelLoadError(
            f"{path}: tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}"
        )
