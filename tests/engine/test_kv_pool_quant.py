"""KIVI packed in the paged pool (issue 17 item 5): chunks of a sequence's oldest slots quantized into pool blocks.

The reference is the single-stream ``LLM(kv="kivi:...")``: it quantizes the same tokens with the same groups, one
token at a time as they leave its window, while the pool packs whole chunks. At a prompt length where both have
quantized the same tokens when the first decode step runs (``sinks + residual + k * chunk``), that step's logits
match to fp32 rounding (the order attention sums slots in differs); later steps keep more exact tokens in the pool.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine_runs import run_engine
from frugallm import LLM, SamplingParams
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.errors import InvalidRequestError
from frugallm.kv import KVSpecError

pytestmark = pytest.mark.usefixtures("one_thread")

KIVI = "kivi:bits=2,group=8,residual=8,sinks=2"
SNAP = "snapkv:budget=0.5,window=8+" + KIVI
BLOCK = 8


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return str(tiny_models.hf("llama"))


@pytest.fixture(scope="module")
def kivi(model_path: str) -> LLM:
    return LLM(model_path, dtype="float32", device="cpu", kv=KIVI)


@pytest.fixture(scope="module")
def full(model_path: str) -> LLM:
    return LLM(model_path, dtype="float32", device="cpu")


def engine(llm: LLM, kv: str | None = None, **kw) -> LLMEngine:
    cfg = dict(num_blocks=64, block_size=BLOCK, max_num_batched_tokens=512, max_num_seqs=8)
    return LLMEngine(llm, EngineConfig(**{**cfg, **kw}, kv=kv))


def tokens(llm: LLM, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, llm.config.vocab_size) for _ in range(n)]


def test_codec_layout_saves_blocks(kivi: LLM) -> None:
    e = engine(kivi)
    c = e.kv_quant
    assert c is not None and c.chunk_tokens % 8 == 0
    assert c.tokens_per_block() > BLOCK  # more tokens per block packed than in fp32


def test_first_decode_matches_single_stream(kivi: LLM) -> None:
    e = engine(kivi)
    c = e.kv_quant
    n = c.sinks + c.residual + 2 * c.chunk_tokens  # both have quantized exactly 2 chunks at the first decode step
    prompt = tokens(kivi, n, 1)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=5)
    ref = kivi.generate([prompt], params)[0]  # one prompt: the single-stream KIVI cache
    (out,) = run_engine(e, [prompt], params)
    assert e.packer.num_packed_chunks == 2
    assert out[0].token_ids == ref.token_ids
    for mine, theirs in zip(out[0].logprobs, ref.logprobs, strict=True):
        assert mine.keys() == theirs.keys()
        for tok, lp in theirs.items():
            assert mine[tok] == pytest.approx(lp, abs=1e-4)


def test_packing_frees_blocks(kivi: LLM) -> None:
    e = engine(kivi)
    c = e.kv_quant
    n = c.sinks + c.residual + 3 * c.chunk_tokens + 5
    rid = e.add_request(tokens(kivi, n, 2), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    seq = e.requests[rid].seqs[0]
    e.step()  # the whole prompt, then its 3 chunks are packed
    bm = e.block_manager
    exact = n - 3 * c.chunk_tokens
    assert seq.num_packed == 3 * c.chunk_tokens
    assert len(seq.packed_table) == 3 * c.blocks_per_chunk
    assert len(seq.block_table) == bm.blocks_for(exact)
    assert bm.num_used_blocks == bm.blocks_for(exact) + 3 * c.blocks_per_chunk < bm.blocks_for(n)
    assert e.gauges()["kv_blocks_packed"][1] == 3 * c.blocks_per_chunk  # /metrics: frugallm_kv_blocks_packed
    bm.check()
    e.run_to_completion()
    assert bm.num_used_blocks == 0


def test_mixed_batch_and_prefix_sharing(kivi: LLM, full: LLM) -> None:
    """kivi and plain requests in one batch; a plain request sharing a kivi request's prompt prefix keeps the
    tokens it has alone (the shared blocks are never requantized or written)."""
    e = engine(kivi)
    c = e.kv_quant
    shared = tokens(kivi, 3 * BLOCK, 3)
    long = shared + tokens(kivi, c.sinks + c.residual + 2 * c.chunk_tokens, 4)
    plain = [shared + tokens(kivi, 20, 5), tokens(kivi, 30, 6)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = [full.generate([p], params)[0].token_ids for p in plain]
    ref = kivi.generate([long], params)[0].token_ids
    rid = e.add_request(long, params)
    e.step()  # the kivi prompt first: its prefix blocks are cached, then it packs
    e.step()
    rids = [e.add_request(p, params, kv="full") for p in plain]
    seqs = [e.requests[r].seqs[0] for r in [rid, *rids]]
    e.run_to_completion()
    assert e.packer.num_packed_chunks >= 2
    assert seqs[1].num_cached_tokens == 3 * BLOCK  # it reused the kivi request's prefix blocks
    assert [s.output().token_ids for s in seqs[1:]] == alone
    assert seqs[0].output().token_ids[:2] == ref[:2]
    assert e.block_manager.num_used_blocks == 0


def test_kivi_tokens_close_to_single_stream_under_preemption(kivi: LLM) -> None:
    """Several kivi sequences in a small pool (preempted and recomputed): each one's first tokens equal the
    single-stream KIVI run's (later ones may differ: the pool keeps more tokens exact between chunks)."""
    c = engine(kivi).kv_quant
    n = c.sinks + c.residual + c.chunk_tokens
    ps = [tokens(kivi, n, 10 + i) for i in range(4)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    ref = [kivi.generate([p], params)[0].token_ids for p in ps]
    per_seq = -(-(n + 3) // BLOCK)
    e = engine(kivi, num_blocks=2 * per_seq, max_num_batched_tokens=n + 16)
    outs = run_engine(e, ps, params)
    assert [o[0].token_ids[:2] for o in outs] == [r[:2] for r in ref]


def test_snapkv_plus_kivi(model_path: str) -> None:
    llm = LLM(model_path, dtype="float32", device="cpu", kv=SNAP)
    e = engine(llm)
    c = e.kv_quant
    keep = c.sinks + c.residual + c.chunk_tokens  # kept by snapkv at budget 0.5: one chunk packs
    prompt = tokens(llm, 2 * keep, 7)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=3)
    ref = llm.generate([prompt], params)[0]
    (out,) = run_engine(e, [prompt], params)
    assert e.packer.num_packed_chunks == 1
    assert out[0].token_ids == ref.token_ids
    for mine, theirs in zip(out[0].logprobs, ref.logprobs, strict=True):
        for tok, lp in theirs.items():
            assert mine[tok] == pytest.approx(lp, abs=1e-4)


def test_specs_accepted_and_refused(full: LLM) -> None:
    for spec in ("kivi:bits=2", "kivi:bits=4", "snapkv:budget=0.25+kivi:bits=2"):
        EngineConfig(kv=spec)
    with pytest.raises(KVSpecError, match="compresses at prefill"):
        EngineConfig(kv="h2o:budget=0.25+kivi:bits=2")
    with pytest.raises(KVSpecError, match="cannot run under continuous batching"):
        EngineConfig(kv="xquant")
    e = engine(full)
    with pytest.raises(InvalidRequestError, match="vgroup"):
        e.add_request([5, 6, 7], SamplingParams(max_tokens=1), kv="kivi:vgroup=8")


def test_served_with_snapkv_plus_kivi(model_path: str) -> None:
    """``serve --kv snapkv:budget=0.5+kivi:...``: the engine packs, answers over HTTP, then holds no block."""
    from fastapi.testclient import TestClient

    from frugallm.engine.async_llm import AsyncLLM
    from frugallm.serve.app import create_app

    llm = LLM(model_path, dtype="float32", device="cpu")
    e = engine(llm, kv=SNAP)
    c = e.kv_quant
    prompt = tokens(llm, 2 * (c.sinks + c.residual + c.chunk_tokens), 8)
    with TestClient(create_app(AsyncLLM(e).start(), "tiny")) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4,
                                                 "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    assert e.packer.num_packed_chunks == 1
    assert e.block_manager.num_used_blocks == 0


def test_one_long_compressible_prefill_at_a_time() -> None:
    """Scheduler alone: a long prompt with a KV policy waits while another one prefills, then until the free blocks
    hold its whole prompt (its first chunk alone would fit); a plain prompt is not held back."""
    from frugallm.engine.block_manager import BlockManager
    from frugallm.engine.scheduler import Scheduler, SchedulerConfig, SeqState

    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128), BlockManager(48, 8))
    a, b = SeqState(list(range(3, 203))), SeqState(list(range(5, 205)))  # 25 blocks each, of 48
    a.kv_quant = b.kv_quant = object()
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.seqs == [a] and out.num_new == [128]
    sched.postprocess(out)
    out = sched.schedule()  # a's last 72 tokens; b's first chunk would fit the 56 left, but a still prefills
    assert out.seqs == [a] and out.num_new == [72] and b in sched.waiting
    sched.postprocess(out)
    out = sched.schedule()  # a holds 25 blocks: 23 free hold b's first chunk (16) but not its prompt (25)
    assert b in sched.waiting and b not in out.seqs
    plain = SeqState(list(range(7, 207)))  # no KV policy: admitted as before
    sched.add(plain)
    sched.waiting.rotate(1)  # plain first in line
    out = sched.schedule()
    assert plain in out.seqs
    for s in list(sched.running):
        sched.finish(s)
    out = sched.schedule()
    assert out.seqs == [b]


def test_prefix_registration_stops_once_packed_and_samples_share_chunks(kivi: LLM) -> None:
    """A kivi prompt registers its full blocks while it prefills (as any prompt); once packed it registers nothing
    more, and its cached prompt still serves the next identical request. ``n=2`` greedy samples fork before
    packing, each packs its own chunks, and both give the single sample's tokens."""
    e = engine(kivi, num_blocks=96)
    c = e.kv_quant
    prompt = tokens(kivi, c.sinks + c.residual + c.chunk_tokens + 3, 9)
    params = SamplingParams(max_tokens=BLOCK + 2, temperature=0, ignore_eos=True)
    rid = e.add_request(prompt, params)
    seq = e.requests[rid].seqs[0]
    e.step()
    bm = e.block_manager
    registered = len(bm.hash_to_block)
    assert seq.num_packed == c.chunk_tokens and registered == len(prompt) // BLOCK
    e.run_to_completion()  # decoding past a block boundary registers no new block
    assert len(bm.hash_to_block) == registered
    hits = bm.prefix_hits
    (again,) = run_engine(e, [prompt], params)
    assert bm.prefix_hits > hits and again[0].token_ids == seq.output().token_ids
    (two,) = run_engine(e, [prompt], params, n=2)
    assert [o.token_ids for o in two] == [seq.output().token_ids] * 2


def test_bf16_pool(model_path: str) -> None:
    """A bf16 pool (the CPU serving default for half models; the fused decode kernel where it builds): chunks are
    laid out for its 2-byte slots, packed rows decode beside plain ones, and every block comes back."""
    llm = LLM(model_path, dtype="bfloat16", device="cpu")
    e = engine(llm, kv=KIVI)
    c = e.kv_quant
    assert e.cache.k[0].dtype == torch.bfloat16 and c.tokens_per_block() > BLOCK
    n = c.sinks + c.residual + c.chunk_tokens
    ps = [tokens(llm, n, 20), tokens(llm, n + 9, 21), tokens(llm, 40, 22)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    rids = [e.add_request(p, params, kv="full" if i == 2 else None) for i, p in enumerate(ps)]
    seqs = [e.requests[r].seqs[0] for r in rids]
    e.run_to_completion()
    assert e.packer.num_packed_chunks == 2 and all(len(s.output().token_ids) == 6 for s in seqs)
    assert e.block_manager.num_used_blocks == 0


def test_snapkv_plus_kivi_packs_single_streams_codes(model_path: str) -> None:
    """The pool packs what single-stream KIVI quantizes, with its groups, codes and scales (issue 17: the paged
    2-bit needle loss is no packing difference; on the bench's 16 passkey prompts single-stream KIVI found fewer).
    After three chunks were packed (one after the prompt, two while decoding): in layer 0, whose keys / values do
    not depend on attention, every packed token equals the single-stream cache's (same slots kept by SnapKV, same
    sinks, groups from the same slot, also for generated tokens); in every layer, the prompt's whole groups do. Later
    tokens differ in deeper layers only because the two caches attended differently: the pool keeps more tokens
    exact between chunks, never fewer."""
    from frugallm.engine.packed_attention import PackedRows
    from frugallm.kv import build_kv_cache

    llm = LLM(model_path, dtype="float32", device="cpu", kv=SNAP)
    e = engine(llm)
    c = e.kv_quant
    keep = c.sinks + c.residual + c.chunk_tokens
    prompt = tokens(llm, 2 * keep + 6, 11)
    rid = e.add_request(prompt, SamplingParams(max_tokens=4 * c.chunk_tokens, temperature=0, ignore_eos=True))
    seq = e.requests[rid].seqs[0]
    while seq.num_packed < 3 * c.chunk_tokens:
        e.step()
    ids = seq.token_ids[:seq.num_computed_tokens]
    model = llm.model
    cache = build_kv_cache(SNAP, model, batch=1, capacity=len(ids), dtype=torch.float32, device="cpu")
    n = len(prompt)
    with torch.inference_mode():
        model(torch.tensor([prompt]), torch.arange(n)[None], cache, "last")
        kept = cache.layers[0].store.num_slots  # the prompt's slots SnapKV kept
        for i in range(n, len(ids)):  # the engine's tokens, one step each
            model(torch.tensor([[ids[i]]]), torch.tensor([[i]]), cache, "last")
    p = seq.num_packed
    prompt_groups = (kept - c.sinks) // c.p.group * c.p.group
    assert p > kept > prompt_groups > c.chunk_tokens
    for layer, st in enumerate(cache.layers):
        k, v = st.store.k, st.store.v  # KIVIStore's QuantizedSequences [1, kv_heads, ...]
        assert k.num_quantized >= p and k.sink.shape[2] == c.sinks
        kb, vb = PackedRows.read(e.cache.k[layer], e.cache.v[layer], c, torch.tensor(seq.packed_table))
        dk, dv = c.decode(kb, vb)
        same = p if layer == 0 else prompt_groups
        assert torch.equal(dk[:, :same], k.dequantized()[0, :, :same])
        assert torch.equal(dv[:, :same], v.dequantized()[0, :, :same])
        assert e.block_manager.num_slots(seq) >= k.sink.shape[2] + k.res.shape[2]
    e.abort(rid)
    e.step()
    assert e.block_manager.num_used_blocks == 0
