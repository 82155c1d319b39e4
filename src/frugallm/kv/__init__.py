"""KV-cache compression you can compose: eviction, quantization, key-channel pruning, prompt selection.

``build_kv_cache(spec, model, ...)`` returns the cache a spec such as ``snapkv:budget=0.25+kivi:bits=2``
describes; ``select_prompt_tokens(spec, model, ids)`` runs a prompt selector (GemFilter) before prefill.
Policies (one file each, registered in ``KV_POLICIES``): kivi, xquant (quantizers), streamingllm, h2o,
snapkv, lacache, speckv (evictors), think (key-channel pruner), gemfilter, specpc (prompt selectors); speckv
and specpc rank with a draft model (``speckv.py``).
"""

from frugallm.kv import gemfilter, h2o, kivi, lacache, snapkv, speckv, streaming, think, xquant  # noqa: F401
from frugallm.kv.cache import CompressedKVCache, build_kv_cache, select_prompt_tokens, select_slots
from frugallm.kv.policy import (
    KV_POLICIES,
    ChannelPruner,
    DecodeContext,
    Evictor,
    KVPolicy,
    KVSpecError,
    PrefillContext,
    PromptSelector,
    Quantizer,
)
from frugallm.kv.spec import KVSpec, paged_names, paged_policy, paged_quantizer, parse_kv_spec

__all__ = [
    "KV_POLICIES",
    "ChannelPruner",
    "CompressedKVCache",
    "DecodeContext",
    "Evictor",
    "KVPolicy",
    "KVSpec",
    "KVSpecError",
    "PrefillContext",
    "PromptSelector",
    "Quantizer",
    "build_kv_cache",
    "paged_names",
    "paged_policy",
    "paged_quantizer",
    "parse_kv_spec",
    "select_prompt_tokens",
    "select_slots",
]
