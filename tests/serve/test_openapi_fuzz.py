"""Schemathesis fuzzing of the OpenAI-compatible server from its OpenAPI document: every route and field, schema-valid
then schema-violating cases; no 5xx, an error body on every 4xx, no KV block left."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
from fastapi.testclient import TestClient

from frugallm import LLM
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

# Every route the app serves; the fuzz fails if one is missing from /openapi.json (and so from the fuzz).
ROUTES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("GET", "/v1/models/{model_id}"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info"),
          ("GET", "/health"), ("GET", "/metrics"), ("POST", "/v1/load_lora_adapter"),
          ("POST", "/v1/unload_lora_adapter")}
FUZZ_EXAMPLES = int(os.environ.get("FRUGALLM_FUZZ_EXAMPLES", "25"))  # per route and mode; x4 for generation


def fuzz_schema(app: Any) -> dict[str, Any]:
    """The app's OpenAPI document with the server's rule for unknown fields spelled out: they pass only as null
    (``additionalProperties: {"type": "null"}``), so schema-valid cases are requests the server accepts and reach
    the engine, instead of stopping at 'unsupported field'."""
    import copy

    raw = copy.deepcopy(app.openapi())
    for schema in raw["components"]["schemas"].values():
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = {"type": "null"}
    return raw


def fuzz(operation: Any, mode: Any, examples: int, statuses: Counter[tuple[str, str, int]]) -> None:
    """``examples`` cases of one route in one generation mode; statuses counted by (path, mode, status)."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        r = case.call()
        statuses[(operation.path, mode.value, r.status_code)] += 1
        assert r.status_code < 500, (case.method, case.path, case.body, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]["message"], r.text[:300]

    run()


def test_openapi_fuzz_no_5xx(tiny_models) -> None:
    """Schemathesis on every route and every field (response_format, logit_bias, stop, tools, ...): schema-valid
    cases, then schema-violating ones; no 5xx, and no KV block left. LoRA slots are on, so the adapter routes run
    their checks instead of answering 'no LoRA slots'."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis.errors import Unsatisfiable

    llm = LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu", max_loras=1)
    # max_model_len: the chat template alone is ~80 tokens
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8, max_model_len=128))
    app = create_app(AsyncLLM(engine).start(), "tiny", max_body_bytes=2**20)
    schema = schemathesis.openapi.from_dict(fuzz_schema(app))
    schema.app = app
    statuses: Counter[tuple[str, str, int]] = Counter()
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} >= ROUTES
    with TestClient(app):  # runs the lifespan (and shuts the engine down at the end)
        for operation in operations:
            for mode in schemathesis.GenerationMode:  # schema-valid cases, then schema-violating ones
                generates = operation.path in ("/v1/completions", "/v1/chat/completions")
                try:
                    fuzz(operation, mode, FUZZ_EXAMPLES * (4 if generates else 1), statuses)
                except Unsatisfiable:  # negative mode on a route with nothing to violate
                    assert mode is schemathesis.GenerationMode.NEGATIVE
    by_status = Counter()
    for (_, _, st), k in statuses.items():
        by_status[st] += k
    print("fuzz statuses:", dict(by_status), "\n", sorted(statuses.items()))
    assert sum(by_status.values()) > 500
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert statuses[(path, "positive", 200)] > 0, f"no schema-valid case of {path} was served"
    assert engine.block_manager.num_used_blocks == 0

