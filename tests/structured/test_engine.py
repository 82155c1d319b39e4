"""Structured output in the paged engine (tiny random model): every constrained choice parses and validates, an
unconstrained neighbour in the same batch is untouched, prefix caching and preemption do not change outputs,
``LLM.generate`` / ``LLM.stream`` constrain single prompts, and a finished grammar ends its sequence."""

from __future__ import annotations

import json

import pytest

from frugallm import LLM, SamplingParams
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.errors import InvalidRequestError
from structured_schemas import SCHEMAS
from structured_schemas import THING as SCHEMA

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_models) -> LLM:
    return LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")


def valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 64, "temperature": 0.0, **kw})


def run(engine: LLMEngine, *reqs: tuple) -> list[list]:
    """Add ``(prompt, params, n)`` requests, run to completion; each request's choices' outputs."""
    rids = [engine.add_request(p, sp, n=n) for p, sp, n in reqs]
    seqs = [list(engine.requests[r].seqs) for r in rids]
    engine.run_to_completion()
    assert engine.block_manager.num_used_blocks == 0
    return [[s.output() for s in ss] for ss in seqs]


def test_n_choices_each_valid(tiny: LLM) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8))
    (outs,) = run(engine, ("a prompt", params(temperature=1.0, seed=7, json_schema=SCHEMA), 5))
    assert len(outs) == 5
    for o in outs:
        valid(o.text, SCHEMA)
        assert o.finish_reason == "stop"
    assert len({o.text for o in outs}) > 1  # distinct samples, each valid


def test_constrained_beside_unconstrained(tiny: LLM) -> None:
    plain = tiny.generate(["the cat sat", "x"], params(max_tokens=12, ignore_eos=True))
    engine = LLMEngine(tiny, EngineConfig(num_blocks=64, block_size=4, max_num_seqs=4))
    outs = run(engine, ("the cat sat", params(max_tokens=12, ignore_eos=True), 1),
               ("hello", params(json_schema=SCHEMA), 2),
               ("x", params(max_tokens=12, ignore_eos=True), 1),
               ("hello", params(grammar='start: "yes" | "no"'), 1))
    assert outs[0][0].token_ids == plain[0].token_ids and outs[2][0].token_ids == plain[1].token_ids
    for o in outs[1]:
        valid(o.text, SCHEMA)
    assert outs[3][0].text in ("yes", "no")


def test_prefix_cache_and_preemption_keep_outputs(tiny: LLM) -> None:
    prompt = "a shared prefix that spans several blocks of four tokens each"
    ref_plain = tiny.generate([prompt, "y"], params(max_tokens=10, ignore_eos=True))[0]
    ref_json = tiny.generate([prompt, "y"], params(json_schema=SCHEMA))[0]
    valid(ref_json.text, SCHEMA)
    engine = LLMEngine(tiny, EngineConfig(num_blocks=64, block_size=4, max_num_seqs=4))
    ((first,),) = run(engine, (prompt, params(json_schema=SCHEMA), 1))
    hits = engine.block_manager.prefix_hits
    (second,), (third,) = run(engine, (prompt, params(max_tokens=10, ignore_eos=True), 1),
                              (prompt, params(json_schema=SCHEMA), 1))
    assert first.text == third.text == ref_json.text
    assert second.token_ids == ref_plain.token_ids
    assert engine.block_manager.prefix_hits > hits  # the later requests reused the first one's prompt blocks
    # A pool too small for every sequence at once: some are preempted and recomputed, same tokens.
    small = LLMEngine(tiny, EngineConfig(num_blocks=24, block_size=4, max_num_seqs=4, enable_prefix_caching=False))
    outs = run(small, *[(prompt, params(json_schema=SCHEMA), 1) for _ in range(4)])
    assert [o[0].text for o in outs] == [ref_json.text] * 4
    assert small.metrics.preemptions.values[""] > 0


@pytest.mark.parametrize("kw", [{"ignore_eos": True}, {"min_tokens": 40, "temperature": 1.0, "seed": 3}])
def test_finished_grammar_ends_the_sequence(tiny: LLM, kw: dict) -> None:
    """Once the grammar is complete nothing may follow: ``ignore_eos`` / ``min_tokens`` cannot append tokens
    past it (they would be end-of-generation filler or, with every token masked, unconstrained text)."""
    (o,) = tiny.generate("hi", params(json_schema=SCHEMA, max_tokens=60, **kw))
    valid(o.text, SCHEMA)
    assert o.finish_reason == "stop" and len(o.token_ids) < 60


def test_llm_generate_and_stream_single_prompt(tiny: LLM) -> None:
    (o,) = tiny.generate("Give me JSON", params(json_schema=SCHEMA))
    valid(o.text, SCHEMA)
    streamed = "".join(tiny.stream("Give me JSON", params(json_schema=SCHEMA)))
    assert streamed == o.text and tiny.last_output.text == o.text
    (g,) = tiny.generate("Pick", params(grammar='start: "left" | "right"'))
    assert g.text in ("left", "right")
    for i, (schema, _) in enumerate(SCHEMAS[:5]):
        (o,) = tiny.generate(f"prompt {i}", params(json_schema=schema, temperature=0.8, seed=i, max_tokens=120))
        valid(o.text, schema)


def test_max_tokens_cuts_a_constrained_output(tiny: LLM) -> None:
    (o,) = tiny.generate("hi", params(json_schema=SCHEMA, max_tokens=3))
    assert o.finish_reason == "length" and len(o.token_ids) == 3 and o.text.startswith("{")


def test_static_loop_refuses_constraints(tiny_models) -> None:
    llm = LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu", batching=False)
    with pytest.raises(InvalidRequestError, match="batching") as e:
        llm.generate("hi", params(json_schema=SCHEMA))
    assert e.value.param == "json_schema"
    with pytest.raises(InvalidRequestError, match="batching"):
        list(llm.stream("hi", params(grammar='start: "a"')))
    assert llm.generate("hi", params(max_tokens=2))[0].text is not None  # unconstrained still runs


def test_paged_kv_policy_keeps_constraints(tiny_models) -> None:
    """A KV policy the paged engine runs (snapkv, kivi) keeps structured output; one it does not (xquant) refuses it."""
    path = str(tiny_models.hf("llama"))
    llm = LLM(path, dtype="float32", device="cpu", kv="snapkv:budget=0.5")
    (o,) = llm.generate("a prompt long enough for a budget", params(json_schema=SCHEMA))
    valid(o.text, SCHEMA)
    assert "".join(llm.stream("a prompt long enough for a budget", params(json_schema=SCHEMA))) == o.text
    (o,) = LLM(path, dtype="float32", device="cpu", kv="kivi:bits=4").generate("hi", params(json_schema=SCHEMA))
    valid(o.text, SCHEMA)
    with pytest.raises(InvalidRequestError, match="xquant"):
        LLM(path, dtype="float32", device="cpu", kv="xquant:bits=4").generate("hi", params(json_schema=SCHEMA))
