"""Speculative decoding: a proposer drafts tokens, the target verifies them in one multi-row pass.

``parse_spec("ngram:k=8")`` -> :class:`SpecConfig`; :func:`build_proposer` makes its proposer (registered in
``PROPOSERS``: ``ngram``, ``draft``, ``self``); :class:`SpecDecoder` runs the loop for one sequence with the
adaptive controller (``adaptive.py``) and exact verification (``verify.py``), counting into :class:`SpecStats`.
Loading a draft model is the engine's job (``engine/llm.py``), so this package stays below ``loading``.
"""

from __future__ import annotations

import torch
from torch import nn

from frugallm.spec import ngram  # noqa: F401 (registers ngram)
from frugallm.spec.config import K_MAX, SpecConfig, SpecError, parse_spec
from frugallm.spec.decoder import SpecDecoder, supports
from frugallm.spec.draft import check_same_vocab, first_layers
from frugallm.spec.proposer import PROPOSERS, Draft, Proposer
from frugallm.spec.stats import SpecStats


def build_proposer(
    cfg: SpecConfig,
    target: nn.Module,
    *,
    kv_dtype: torch.dtype,
    draft_model: nn.Module | None = None,
    draft_weight_bytes: int = 0,
) -> Proposer:
    """The proposer ``cfg`` names. ``target``: the target ``llama.Transformer`` (``self`` drafts with its first
    layers); ``draft_model``: the loaded draft for ``draft`` (vocabulary already checked)."""
    cls = PROPOSERS.get(cfg.method)
    vocab = target.config.vocab_size
    if cfg.method == "ngram":
        return cls(n=cfg.n, min_n=cfg.min_n)
    if cfg.method == "self":
        layers = cfg.layers if cfg.layers is not None else max(1, len(target.layers) // 2)
        return cls(first_layers(target, layers), vocab, kv_dtype)
    if draft_model is None:
        raise SpecError("draft: no draft model was loaded")
    return cls(draft_model, vocab, kv_dtype, draft_weight_bytes)


__all__ = [
    "K_MAX",
    "PROPOSERS",
    "Draft",
    "Proposer",
    "SpecConfig",
    "SpecDecoder",
    "SpecError",
    "SpecStats",
    "build_proposer",
    "check_same_vocab",
    "parse_spec",
    "supports",
]
