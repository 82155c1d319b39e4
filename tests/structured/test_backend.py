"""The llguidance backend on the tiny byte-level tokenizer: schemas and grammars compile once into matchers
that allow exactly the valid continuations; what the library rejects is an ``InvalidRequestError`` naming the
field at fault."""

from __future__ import annotations

import json

import pytest
import torch

from frugallm import LLM, SamplingParams
from frugallm.errors import InvalidRequestError
from frugallm.structured import BACKENDS, apply_bitmask, backend_for, constraint_of
from structured_schemas import SCHEMAS

pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def tiny(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def backend(tiny: LLM):
    return backend_for(tiny.tokenizer, tiny.config.vocab_size)


def allowed(matcher, vocab: int) -> torch.Tensor:
    """The ``[vocab]`` bool mask a matcher allows now."""
    mask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    matcher.fill(mask, 0)
    logits = torch.zeros(1, vocab)
    apply_bitmask(logits, mask, [0])
    return torch.isfinite(logits[0])


def walk(matcher, ids: list[int], vocab: int) -> None:
    """Feed ``ids`` one by one, each allowed by the mask before it and accepted."""
    for t in ids:
        assert allowed(matcher, vocab)[t], f"token {t} masked"
        assert matcher.accept(t)


def test_backend_is_shared_per_tokenizer(tiny: LLM, backend) -> None:
    assert backend_for(tiny.tokenizer, tiny.config.vocab_size) is backend
    assert "llguidance" in BACKENDS


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_each_schema_accepts_its_instance(tiny: LLM, backend, i: int) -> None:
    schema, instance = SCHEMAS[i]
    vocab = tiny.config.vocab_size
    m = backend.compile("json_schema", json.dumps(schema))
    assert not m.done
    walk(m, tiny.tokenizer.encode(json.dumps(instance)), vocab)
    assert m.done
    eos = sorted(tiny.tokenizer.eos_ids)
    assert allowed(m, vocab)[eos].all()  # complete: end of generation is allowed


def test_mask_excludes_what_the_schema_forbids(tiny: LLM, backend) -> None:
    vocab, tok = tiny.config.vocab_size, tiny.tokenizer
    m = backend.compile("json_schema", json.dumps({"type": "object", "properties": {"c": {"enum": ["red", "blue"]}},
                                                   "required": ["c"], "additionalProperties": False}))
    first = allowed(m, vocab)
    assert first[tok.encode("{")[0]] and not first[tok.encode("[")[0]]
    walk(m, tok.encode('{"c": "'), vocab)
    now = allowed(m, vocab)
    g = tok.token_to_id("g")
    assert g is not None and not now[g]  # neither value starts with g
    assert not m.accept(g)  # a token outside the grammar is refused


def test_copy_is_independent(tiny: LLM, backend) -> None:
    vocab, tok = tiny.config.vocab_size, tiny.tokenizer
    m = backend.compile("json_schema", '{"type": "object"}')
    c = m.copy()
    walk(m, tok.encode("{}"), vocab)
    assert m.done and not c.done
    walk(c, tok.encode('{"a": 1}'), vocab)
    assert c.done


def test_lark_grammar(tiny: LLM, backend) -> None:
    vocab, tok = tiny.config.vocab_size, tiny.tokenizer
    m = backend.compile("grammar", 'start: "yes" | "no"')
    walk(m, tok.encode("no"), vocab)
    assert m.done
    m = backend.compile("grammar", 'start: "yes" | "no"')
    assert not allowed(m, vocab)[tok.encode("x")[0]]


@pytest.mark.parametrize(("kind", "text", "needle"), [
    ("json_schema", '{"type": "nonsense"}', "nonsense"),
    ("json_schema", '{"$ref": "#/nope"}', "nope"),
    ("json_schema", '{"type": "string", "pattern": "(("}', "regex"),
    ("json_schema", '{"allOf": 3}', "allOf"),
    ("grammar", "start: foo", "foo"),
    ("grammar", "start: /[a/", "regex"),
    ("grammar", "not a grammar at all", "grammar"),
])
def test_rejected_constraint_names_it(backend, kind: str, text: str, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        backend.compile(kind, text)
    assert e.value.param == kind and kind in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("schema", ["[1, 2]", '"a string"', "3", "{not json"])
def test_non_object_json_schema(schema: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(json_schema=schema)
    assert "json_schema" in str(e.value)


def test_constraint_of() -> None:
    assert constraint_of(SamplingParams()) is None
    assert constraint_of(SamplingParams(json_schema={"type": "object"})) == ("json_schema", '{"type": "object"}')
    assert constraint_of(SamplingParams(grammar='start: "a"')) == ("grammar", 'start: "a"')
    with pytest.raises(InvalidRequestError, match="exclusive"):
        SamplingParams(json_schema={"type": "object"}, grammar='start: "a"')
