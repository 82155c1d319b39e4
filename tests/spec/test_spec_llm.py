"""Speculative decoding through ``LLM`` on tiny random models (fp32): greedy output identical to plain decoding
for every proposer, the multi-row verify pass against the one-row path, KV rollback, the draft-vocabulary check,
sampling, adaptive switching off, and the stats."""

from __future__ import annotations

import pytest
import torch

from frugallm import LLM, SamplingParams
from frugallm.errors import FrugalError
from frugallm.spec import Draft, Proposer, SpecConfig, SpecDecoder, SpecError, SpecStats, build_proposer

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["hello world, hello world, hello", "the cat sat on the mat", "x y z x y z x", "abc def abc"]
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def target_path(tiny_models) -> str:
    return str(tiny_models.gguf("llama", "F32"))


@pytest.fixture(scope="module")
def plain(target_path: str) -> LLM:
    return LLM(target_path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference(plain: LLM) -> list[list[int]]:
    return [plain.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize("spec", ["ngram:k=4", "ngram:k=8:adaptive=off", "self:layers=1:k=3:adaptive=off"])
def test_greedy_output_identical_to_plain_decoding(target_path: str, reference: list[list[int]], spec: str) -> None:
    llm = LLM(target_path, dtype="float32", device="cpu", spec=spec)
    outs = [llm.generate(p, GREEDY)[0] for p in PROMPTS]
    assert [o.token_ids for o in outs] == reference
    streamed = "".join(llm.stream(PROMPTS[0], GREEDY))
    assert streamed == outs[0].text and llm.last_output.token_ids == reference[0]
    assert llm.spec_stats.rounds > 0 and llm.spec_stats.drafted > 0


def test_draft_model_greedy_identical_and_accepted(tiny_models, target_path: str, reference: list[list[int]]) -> None:
    # The target as its own draft: the one-row draft steps and the multi-row verify agree on (nearly) every token.
    llm = LLM(target_path, dtype="float32", device="cpu", spec=f"draft:model={target_path}:k=4:adaptive=off")
    outs = [llm.generate(p, GREEDY)[0] for p in PROMPTS]
    assert [o.token_ids for o in outs] == reference
    st = llm.spec_stats
    assert st.acceptance_rate > 0.95
    assert st.mean_accepted_length > 4.5
    assert outs[0].metrics["spec_memory_bytes"] >= llm.draft.weight_bytes()
    # Another architecture with the same tokenizer drafts too (its guesses are mostly wrong; output unchanged).
    other = LLM(target_path, dtype="float32", device="cpu",
                spec=f"draft:model={tiny_models.gguf('qwen2', 'F32')}:k=2:adaptive=off")
    assert [other.generate(p, GREEDY)[0].token_ids for p in PROMPTS] == reference
    # Several prompts in one call: a static batch (batching=False) decodes them one at a time, speculatively.
    static = LLM(target_path, dtype="float32", device="cpu", batching=False, spec="ngram:k=4")
    assert [o.token_ids for o in static.generate(PROMPTS, GREEDY)] == reference
    assert static.spec_stats.rounds > 0


def test_draft_with_another_vocabulary_is_one_clear_error(target_path: str) -> None:
    with pytest.raises(SpecError) as e:
        LLM(target_path, dtype="float32", device="cpu", spec="draft:model=default")
    msg = str(e.value)
    assert "different vocabulary" in msg and "49152 tokens" in msg and "384 tokens" in msg


def test_spec_with_a_compressed_kv_cache_is_refused(target_path: str) -> None:
    with pytest.raises(FrugalError, match="cannot drop the keys/values of rejected drafts"):
        LLM(target_path, dtype="float32", device="cpu", spec="ngram", kv="snapkv:budget=0.5")


@torch.inference_mode()
def test_multi_row_verify_pass_matches_the_one_row_path(plain: LLM) -> None:
    """Rows of one (k + 1)-row pass against k + 1 one-row steps on the same cache contents. fp32 torch linears
    sum in a different order at 1 row (MKL gemv) and at several (gemm): equal to rounding, same argmax (GGUF
    weights run as stored are row-exact, and attention is: see the test below)."""
    m, ids = plain.model, plain.tokenizer.encode(PROMPTS[1])
    n = len(ids)
    toks = plain.generate(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids
    one = plain.make_cache(1, 64)
    m(torch.tensor([ids]), torch.arange(n)[None], one, "last")
    rows = [m(torch.tensor([[t]]), torch.tensor([[n + i]]), one, "last")[0] for i, t in enumerate(toks)]
    multi = plain.make_cache(1, 64)
    m(torch.tensor([ids]), torch.arange(n)[None], multi, "last")
    verify = m(torch.tensor([toks]), torch.arange(n, n + 6)[None], multi, "all")[0]
    for i in range(6):
        assert torch.allclose(verify[i], rows[i], rtol=0, atol=1e-4), i
        assert int(verify[i].argmax()) == int(rows[i].argmax())
    assert multi.num_slots == one.num_slots == n + 6


@torch.inference_mode()
def test_few_row_attention_equals_one_token_steps(plain: LLM) -> None:
    """A few-row pass after a prefix attends each row exactly as its one-token step does, bit for bit (one masked
    SDPA call over all rows rounded differently: an ulp that the 1.5B model's activations grew to 0.14 in the
    logits, flipping a greedy near-tie in a speculative chat run)."""
    attn = plain.model.layers[0].attn
    nh, nkv, d = attn.n_heads, attn.n_kv, attn.head_dim
    g = torch.Generator().manual_seed(0)
    a, b = plain.make_cache(1, 64), plain.make_cache(1, 64)
    prefix = [torch.randn(1, h, 7, d, generator=g) for h in (nh, nkv, nkv)]
    for c in (a, b):
        attn.attend(*prefix, torch.zeros(1, 7, attn.q_size), c, None)
    q, k, v = (torch.randn(1, h, 5, d, generator=g) for h in (nh, nkv, nkv))
    many = attn.attend(q, k, v, torch.zeros(1, 5, attn.q_size), a, None)
    ones = [attn.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], torch.zeros(1, 1, attn.q_size), b, None)
            for i in range(5)]
    assert torch.equal(many, torch.cat(ones, 1))


@torch.inference_mode()
def test_rollback_drops_rejected_keys_and_values(plain: LLM) -> None:
    """A verify pass with wrong drafts, truncated to the kept tokens, leaves the cache as if they never ran."""
    m, ids = plain.model, plain.tokenizer.encode(PROMPTS[0])
    n = len(ids)
    a, b = plain.make_cache(1, 64), plain.make_cache(1, 64)
    for c in (a, b):
        m(torch.tensor([ids]), torch.arange(n)[None], c, "last")
    good = plain.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0].token_ids
    wrong = (good[1] + 1) % plain.config.vocab_size
    m(torch.tensor([[good[0], wrong, 7, 9]]), torch.arange(n, n + 4)[None], a, "all")
    a.truncate(n + 1)  # keep only good[0]
    m(torch.tensor([[good[0]]]), torch.tensor([[n]]), b, "last")
    assert a.num_slots == b.num_slots == n + 1
    la = m(torch.tensor([[good[1]]]), torch.tensor([[n + 1]]), a, "last")
    lb = m(torch.tensor([[good[1]]]), torch.tensor([[n + 1]]), b, "last")
    assert torch.allclose(la, lb, rtol=0, atol=1e-5)
    assert int(la.argmax()) == good[2]


def test_sampling_is_seeded_and_runs_rounds(target_path: str) -> None:
    llm = LLM(target_path, dtype="float32", device="cpu", spec=f"draft:model={target_path}:k=3:adaptive=off")
    p = SamplingParams(max_tokens=30, temperature=0.8, top_k=50, seed=5, ignore_eos=True)
    a, b = llm.generate(PROMPTS[2], p)[0], llm.generate(PROMPTS[2], p)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30
    assert a.metrics["spec_rounds"] > 0 and a.metrics["spec_acceptance_rate"] > 0.5  # draft == target: q == p


class WrongProposer(Proposer):
    """Always proposes tokens the target will not pick (a low-acceptance workload)."""

    name = "wrong"

    def propose(self, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None) -> Draft:
        return Draft([(tokens[-1] * 7 + i + 1) % 384 for i in range(k)])


def test_adaptive_switches_itself_off_on_a_low_acceptance_workload(plain: LLM, reference: list[list[int]]) -> None:
    seq = plain._sequences([PROMPTS[0]], SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))[0]
    ids = torch.tensor([seq.prompt_ids])
    cache = plain.make_cache(1, len(seq.prompt_ids) + 140)
    with torch.inference_mode():
        logits = plain.model(ids, torch.arange(ids.shape[1])[None], cache, "last")
        stats = SpecStats()
        dec = SpecDecoder(SpecConfig("ngram", k=6), WrongProposer(), stats)
        for _ in dec.run(plain.model, cache, seq, plain.device, lambda: seq.append(int(logits[0].argmax()))):
            pass
    ref = plain.generate(PROMPTS[0], SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))[0].token_ids
    assert seq.output_ids == ref
    assert stats.acceptance_rate < 0.2
    assert stats.plain_steps > 3 * stats.rounds  # mostly plain decoding once acceptance was measured


def test_build_proposer_layers_bound(plain: LLM) -> None:
    with pytest.raises(SpecError, match=r"layers must be in \[1, 1\]"):
        build_proposer(SpecConfig("self", k=2, layers=2), plain.model, kv_dtype=torch.float32)


def test_several_prompts_decode_speculatively_one_by_one_when_that_pays(target_path: str,
                                                                        reference: list[list[int]]) -> None:
    """generate() with several prompts: two prompts (nothing measured yet) go one by one through SpecDecoder; a
    larger batch is batched without speculation unless the measured speedup beats batching. Greedy output is the
    plain decoding's either way."""
    llm = LLM(target_path, dtype="float32", device="cpu", spec="ngram:k=4:adaptive=off")
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY)] == reference[:2]
    assert llm.spec_stats.rounds > 0  # the first call had nothing measured: one by one, speculatively
    gain = llm.spec_stats.measured_speedup
    assert gain is not None and llm._spec_one_by_one(llm._sequences(PROMPTS[:2], GREEDY)) == (gain > 2 / 1.05)
    before = llm.spec_stats.rounds
    fresh = LLM(target_path, dtype="float32", device="cpu", spec="ngram:k=4")
    assert [o.token_ids for o in fresh.generate(PROMPTS, GREEDY)] == reference  # 4 prompts: batched
    assert fresh.spec_stats.rounds == 0
    # The measured speedup decides: 3 prompts go one by one only when speculation ran > 3 / 1.1 times faster.
    seqs = llm._sequences(PROMPTS[:3], GREEDY)
    llm.spec_stats = SpecStats(rounds=10, emitted=40, verify_s=1.0, plain_steps=10, plain_s=1.0)  # 2.5x
    assert llm.spec_stats.measured_speedup == pytest.approx(2.5)
    assert not llm._spec_one_by_one(seqs) and llm._spec_one_by_one(seqs[:2])
    llm.spec_stats = SpecStats(rounds=10, emitted=60, verify_s=1.0, plain_steps=10, plain_s=1.0)  # 3.5x
    assert llm._spec_one_by_one(seqs)
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)] == reference[:3]
    assert llm.spec_stats.rounds > 10 and before > 0
    # Requests speculation does not serve exactly (logprobs) keep the batched path.
    assert not llm._spec_one_by_one(llm._sequences(PROMPTS[:2], SamplingParams(max_tokens=4, logprobs=2)))
