"""The structured-output target (issue 17): all 20 schemas of ``tests/fixtures/structured_schemas.py`` with the
default model, greedy, through the paged engine in one batch: every output parses and validates (100 %)."""

from __future__ import annotations

import json

import pytest

from frugallm import LLM, SamplingParams
from structured_schemas import SCHEMAS

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.slow


def test_twenty_schemas_default_model() -> None:
    llm = LLM("default", dtype="float32", device="cpu")
    prompts, params = [], []
    for schema, example in SCHEMAS:
        msg = f"Reply with a JSON object matching this schema: {json.dumps(schema)}. Example: {json.dumps(example)}"
        prompts.append(llm.chat_prompt([{"role": "user", "content": msg}]))
        params.append(SamplingParams(max_tokens=160, temperature=0.0, json_schema=schema))
    outs = llm.generate(prompts, params)
    failures = []
    for i, ((schema, _), out) in enumerate(zip(SCHEMAS, outs, strict=True)):
        try:
            jsonschema.validate(json.loads(out.text), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append(f"schema {i}: {out.finish_reason} {out.text!r}: {str(e)[:120]}")
    assert not failures, "\n".join(failures)
    assert all(o.finish_reason == "stop" for o in outs)
