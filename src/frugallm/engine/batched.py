"""A fixed list of prompts run to completion on a fresh :class:`LLMEngine` sized to them: what ``LLM.generate``
(several prompts, or one on the engine's loop) and the benchmarks call."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence as Seq
from typing import Any

from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.engine.paged_cache import pool_dtype
from frugallm.engine.sequence import RequestOutput
from frugallm.errors import InvalidRequestError
from frugallm.kv import paged_policy
from frugallm.sampling import SamplingParams


def batch_config(llm: Any, prompts_token_ids: list[list[int]], params: list[SamplingParams],
                 exact_kv: bool = False) -> EngineConfig:
    """An engine sized to these prompts: every sequence at full length, capped at ``kv_memory_gb`` (past the cap
    sequences are preempted and recomputed, which does not change their tokens)."""
    bs = EngineConfig.block_size
    need = [-(-min(len(p) + sp.max_tokens, llm.max_model_len) // bs)
            for p, sp in zip(prompts_token_ids, params, strict=True)]
    kv_dtype = llm.kv_dtype if exact_kv else pool_dtype(llm.dtype, llm.kv_dtype, llm.device)
    cap = LLMEngine.blocks_in(llm, EngineConfig.kv_memory_gb, bs, kv_dtype)
    seqs_cap = min(len(need), 256)
    # A KV policy that reads every prompt query (H2O) computes each prompt in one pass.
    policy = paged_policy(getattr(llm, "kv_spec", None))
    queries = max((policy.prefill_queries(len(p)) for p in prompts_token_ids), default=0) if policy else 0
    alone = len(prompts_token_ids[0]) if len(prompts_token_ids) == 1 else 0  # one prompt: prefilled in one pass
    return EngineConfig(max_num_seqs=seqs_cap, max_num_batched_tokens=max(512, seqs_cap, queries, alone),
                        num_blocks=max(min(sum(need), cap), max(need)), exact_kv=exact_kv)


def generate_batched(llm: Any, prompts_token_ids: list[list[int]], params: list[SamplingParams],
                     config: EngineConfig | None = None, loras: Seq[Any] | None = None) -> list[RequestOutput]:
    """Generate for many prompts with continuous batching; one output per prompt, in order.

    The KV pool is sized to the batch (every sequence at full length, capped at ``kv_memory_gb``; past the
    cap sequences are preempted and recomputed, which does not change their tokens).
    """
    if len(prompts_token_ids) != len(params):
        raise InvalidRequestError(f"{len(prompts_token_ids)} prompts but {len(params)} sampling params")
    if not prompts_token_ids:
        return []
    engine = LLMEngine(llm, config or batch_config(llm, prompts_token_ids, params))
    start = time.perf_counter()
    seqs = []
    for i, (ids, sp) in enumerate(zip(prompts_token_ids, params, strict=True)):
        rid = engine.add_request(ids, sp, arrival_time=start, lora=loras[i] if loras else None)
        seqs.append(engine.requests[rid].seqs[0])
    engine.run_to_completion()
    return [dataclasses.replace(s.output(), request_id=i) for i, s in enumerate(seqs)]
