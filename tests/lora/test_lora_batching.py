"""Rows with different adapters (and none) in one batch, LRU slots with reloads, prefixes cached per adapter."""

from __future__ import annotations

import pytest
import torch
from peft_adapters import VARIANTS, make_adapter, peft_logits

from frugallm import LLM, SamplingParams
from frugallm.engine.block_manager import BlockManager
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.engine.scheduler import SeqState

pytest.importorskip("peft")
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    ref = tiny_models.hf_reference("llama")
    root = tmp_path_factory.mktemp("adapters")
    kinds = list(VARIANTS.values())
    return ref, {f"a{i}": make_adapter(ref, root / f"a{i}", seed=10 + i, **kinds[i % 3]) for i in range(5)}


def test_mixed_batch_matches_each_alone(tiny_models, adapters) -> None:
    """One engine step decodes rows of 3 adapters and rows with none together; each row's tokens are those of
    its prompt generated alone (static loop) and those peft predicts."""
    ref, paths = adapters
    names = ["a0", None, "a1", "a2", "a0", None]
    llm = LLM(tiny_models.hf("llama"), dtype="float32", device="cpu", max_loras=4, max_lora_rank=8,
              lora={n: paths[n] for n in ("a0", "a1", "a2")})
    prompts = [[5 + i, 17, 30 + 2 * i, 9, 44] for i in range(len(names))]
    batched = llm.generate(prompts, GREEDY, lora=names)
    for p, name, out in zip(prompts, names, batched, strict=True):
        alone = llm.generate(p, GREEDY, lora=name)[0]
        assert out.token_ids == alone.token_ids, name
        if name is not None:
            want = peft_logits(ref, paths[name], p + out.token_ids[:-1]).argmax(-1)[len(p) - 1:].tolist()
            assert out.token_ids == want, name


def test_lru_evicts_and_reloads(tiny_models, tiny_ids, adapters) -> None:
    """5 adapters, 2 slots: every request gets its own adapter's logits; evicted adapters are read again."""
    ref, paths = adapters
    llm = LLM(tiny_models.hf("llama"), dtype="float32", device="cpu", max_loras=2, max_lora_rank=8, lora=paths)
    want = {n: peft_logits(ref, p, tiny_ids) for n, p in paths.items()}
    for n in ["a0", "a1", "a2", "a3", "a4", "a0", "a3", "a1"]:
        torch.testing.assert_close(llm.score(tiny_ids, lora=n), want[n], atol=1e-4, rtol=0)
    assert len(llm.lora.slots) == 2
    assert llm.lora.loads == 8  # every request here missed the two slots
    # A batch of 4 prompts over 3 adapters with 2 slots: the scheduler keeps <= 2 adapters running at once.
    prompts = [tiny_ids[:5], tiny_ids[1:7], tiny_ids[2:6], tiny_ids[3:9]]
    outs = llm.generate(prompts, GREEDY, lora=["a2", "a4", "a0", "a2"])
    for p, n, o in zip(prompts, ["a2", "a4", "a0", "a2"], outs, strict=True):
        assert o.token_ids == llm.generate(p, GREEDY, lora=n)[0].token_ids


def test_prefix_cache_keyed_by_adapter() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    toks = list(range(13))

    class Lora:
        def __init__(self, i: int) -> None:
            self.lora_id = i

    for lora in (None, Lora(1)):
        s = SeqState(list(toks), lora=lora)
        bm.allocate(s, [], len(toks))
        s.num_computed_tokens = len(toks)
        bm.commit(s)
        bm.free_seq(s)
    assert len(bm.match_prefix(toks)) == 3 and len(bm.match_prefix(toks, 1)) == 3
    assert bm.match_prefix(toks, 2) == []  # computed under no other adapter
    assert set(bm.match_prefix(toks)).isdisjoint(bm.match_prefix(toks, 1))
    bm.check()


def test_engine_never_shares_a_prefix_across_adapters(tiny_models, adapters) -> None:
    ref, paths = adapters
    llm = LLM(tiny_models.hf("llama"), dtype="float32", device="cpu", max_loras=2, max_lora_rank=8,
              lora={"a0": paths["a0"], "a1": paths["a1"]})
    engine = LLMEngine(llm, EngineConfig(max_num_seqs=4, block_size=4, num_blocks=64))
    prompt = list(range(3, 40))
    outs = {}
    for name in ("a0", "a1", "a0"):
        rid = engine.add_request(prompt, GREEDY, lora=name)
        seq = engine.requests[rid].seqs[0]
        engine.run_to_completion()
        outs.setdefault(name, []).append((seq.num_cached_tokens, seq.output_ids))
    assert outs["a1"][0][0] == 0  # the a0 prefix in the cache was not reused
    assert outs["a0"][1][0] > 0 and outs["a0"][1][1] == outs["a0"][0][1]  # a0's own prefix was
    want = peft_logits(ref, paths["a1"], prompt + outs["a1"][0][1][:-1]).argmax(-1)[len(prompt) - 1:].tolist()
    assert outs["a1"][0][1] == want
