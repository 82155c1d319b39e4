"""``draft:...:weights=MODE``: the draft model runs with its own weights mode (``stored-q8``: int8 activations, a
cheaper inexact draft) while the target stays exact: greedy output is unchanged."""

from __future__ import annotations

import pytest

from frugallm import LLM, SamplingParams, native
from frugallm.spec import SpecError, parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_weights_key_parses_round_trips_and_rejects_bad_values() -> None:
    cfg = parse_spec("draft:model=qwen2.5-coder-0.5b:k=4:weights=stored-q8")
    assert cfg is not None and cfg.weights == "stored-q8" and parse_spec(str(cfg)) == cfg
    assert parse_spec("draft:model=m").weights is None  # the target's mode
    with pytest.raises(SpecError, match="weights must be one of auto, stored, stored-q8, dequantize, got 'int4'"):
        parse_spec("draft:model=m:weights=int4")
    with pytest.raises(SpecError, match="ngram has no key 'weights'"):
        parse_spec("ngram:weights=stored-q8")
    with pytest.raises(SpecError, match="self has no key 'weights'"):
        parse_spec("self:layers=2:weights=stored-q8")


@pytest.mark.skipif(not native.usable("gguf_q8"), reason="native gguf_q8 kernel unavailable here")
def test_stored_q8_draft_beside_an_exact_target_keeps_the_greedy_output(tiny_models, tiny_ids) -> None:
    kw = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "tie_word_embeddings": True}
    path = str(tiny_models.gguf("qwen2", "Q4_K", overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K"}, **kw))
    prompt = tiny_ids[:12]
    ref = LLM(path, device="cpu").generate([prompt], GREEDY)[0].token_ids
    llm = LLM(path, device="cpu", spec=f"draft:model={path}:k=4:adaptive=off:weights=stored-q8")
    assert llm.weights == "stored" and llm.draft.weights == "stored-q8"
    out = llm.generate([prompt], GREEDY)[0]
    assert out.token_ids == ref
    assert out.metrics["spec_rounds"] > 0 and out.metrics["spec_acceptance_rate"] > 0.5  # q8 copy of the target
    llm.set_spec(f"draft:model={path}:k=3:weights=dequantize")  # serve's path: after loading
    assert llm.draft.weights == "dequantize" and llm.generate([prompt], GREEDY)[0].token_ids == ref
