"""Quality metrics (perplexity, KL, top-1 agreement) and the passkey generator, on the default model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from frugallm import LLM
from frugallm.cli import main
from frugallm.corpus import builtin_corpus
from frugallm.errors import FrugalError
from frugallm.lab import passkey, quality


@pytest.fixture(scope="module")
def llm():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: one thread is faster and steadier
    yield LLM("default", dtype="float32", device="cpu")
    torch.set_num_threads(n)


def test_perplexity_is_exp_mean_nll(llm) -> None:
    text = builtin_corpus()[:20_000]
    q = quality.evaluate(llm.score, llm.tokenizer, model_key="t", make_reference=None, corpus_text=text,
                         windows=2, window_len=48)
    ids = llm.tokenizer.encode(text)
    total, count = 0.0, 0
    for w in (ids[:48], ids[48:96]):
        logits = llm.score(w)
        total += F.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum").item()
        count += len(w) - 1
    assert q.predictions == count == 94
    assert q.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert q.kl_divergence is None and q.top1_agreement is None


def test_kl_against_itself_is_zero_and_reference_is_cached(llm) -> None:
    calls = []

    def make():
        calls.append(1)
        return llm.score

    kw = dict(model_key="self-test", make_reference=make, windows=2, window_len=32)
    q1 = quality.evaluate(llm.score, llm.tokenizer, **kw)
    q2 = quality.evaluate(llm.score, llm.tokenizer, **kw)
    assert len(calls) == 1  # the reference log-probs were computed once
    for q in (q1, q2):
        assert abs(q.kl_divergence) < 1e-6 and q.top1_agreement == 1.0
    # A perturbed model diverges: KL > 0 and agreement < 1 (sanity of the metric's direction).
    noisy = quality.evaluate(lambda ids: llm.score(ids) + 3 * torch.randn(len(ids), llm.config.vocab_size,
                                                                          generator=torch.Generator().manual_seed(0)),
                             llm.tokenizer, **kw)
    assert noisy.kl_divergence > 0.01 and noisy.top1_agreement < 1.0


def test_passkey_prompt_length_and_depth(llm) -> None:
    tok = llm.tokenizer
    for ctx in (256, 1024):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            p = passkey.make_prompt(tok, ctx, depth, "48213")
            assert abs(len(p.ids) - ctx) <= 0.02 * ctx
            assert "The pass key is 48213. Remember it." in tok.decode(p.ids[p.needle_start:p.needle_start
                                                                               + p.needle_len])
            longest = max(len(tok.encode(" " + s)) for s in passkey.REPEAT_FILLER)
            assert abs(p.actual_depth - depth) * ctx <= longest + 1  # sentence-aligned, nearest boundary
    text = tok.decode(passkey.make_prompt(tok, 256, 0.5, "11111").ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("The pass key is")  # chat template used
    plain = tok.decode(passkey.make_prompt(tok, 256, 0.5, "11111", chat=False).ids, skip_special_tokens=False)
    assert "<|im_start|>" not in plain
    with pytest.raises(FrugalError, match="too short"):
        passkey.make_prompt(tok, 20, 0.5, "11111")
    corpus_filler = passkey.filler_sentences(builtin_corpus())
    p = passkey.make_prompt(tok, 512, 0.3, "22222", sentences=corpus_filler)
    assert len(p.ids) == 512


def test_haystacks_are_digit_free_and_of_their_kind(llm) -> None:
    tok = llm.tokenizer
    for name in passkey.HAYSTACKS:
        h = passkey.haystack(name)
        assert len(h.units) >= 5 and not any(c.isdigit() for u in h.units for c in u)
        p = passkey.make_prompt(tok, 400, 0.5, "31415", sentences=h.units, sep=h.sep, chat=False)
        assert len(p.ids) == 400 and "The pass key is 31415." in tok.decode(p.ids)
    assert "def " in "\n".join(passkey.haystack("code").units)
    assert all(u.startswith("- ") for u in passkey.haystack("list").units)
    with pytest.raises(FrugalError, match="unknown haystack"):
        passkey.haystack("poems")


def test_passkey_counts_every_needle(llm) -> None:
    tok = llm.tokenizer

    def oracle(prompts, n):  # right everywhere but in code (the needle on its own line, no "- " list items)
        texts = [tok.decode(p) for p in prompts]
        code = [t.count("\nThe pass key is") == 2 and "\n- " not in t for t in texts]  # the needle + the answer
        return ["?" if c else t.split("The pass key is ")[1][:5] for t, c in zip(texts, code, strict=True)]

    res = passkey.evaluate(oracle, tok, context_len=200, depths=[0, 0.5, 1], trials=3,
                           haystacks=["prose", "code", "list"], chat=False)
    assert res["needles"] == 27 and res["correct"] == 18
    assert res["counts"]["all"] == "18/27 (67%)" and res["counts"]["code"] == "0/9 (0%)"
    assert res["counts"]["prose"] == "9/9 (100%)" and res["counts"]["depth 0.5"] == "6/9 (67%)"
    assert res["per_haystack"] == {"prose": 1.0, "code": 0.0, "list": 1.0}


def test_passkey_scoring(llm) -> None:
    tok = llm.tokenizer

    def oracle(prompts, n):  # answers with the digits of the needle
        return [tok.decode(p).split("The pass key is ")[1][:5] for p in prompts]

    res = passkey.evaluate(oracle, tok, context_len=200, depths=[0, 0.5, 1], trials=2)
    assert res["accuracy"] == 1.0 and set(res["per_depth"]) == {"0", "0.5", "1"}
    res = passkey.evaluate(lambda prompts, n: ["no idea"] * len(prompts), tok, context_len=200, depths=[0.5],
                           trials=2)
    assert res["accuracy"] == 0.0
    with pytest.raises(FrugalError, match="exceeds the model's context"):
        passkey.evaluate(oracle, tok, context_len=4000, depths=[0.5], trials=1, max_model_len=2048)


def test_eval_cli(capsys) -> None:
    assert main(["eval", "default", "--dtype", "float32", "--device", "cpu", "--threads", "1", "--task", "ppl",
                 "--windows", "1", "--window-len", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"] > 1 and out["kl_divergence"] == 0.0 and out["top1_agreement"] == 1.0
    assert main(["eval", "default", "--dtype", "float32", "--threads", "1", "--task", "passkey", "--context", "160",
                 "--depths", "0.5", "--trials", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["accuracy"] <= 1.0 and len(out["samples"]) == out["needles"] == 3  # one per haystack
    assert out["counts"]["all"].startswith(f"{out['correct']}/3 ")
    assert main(["eval", "--task", "passkey", "--depths", "2"]) == 2
    assert "--depths" in capsys.readouterr().err
    assert main(["eval", "--task", "passkey", "--haystacks", "prose,poems"]) == 2
    assert "--haystacks" in capsys.readouterr().err


@pytest.mark.slow
def test_perplexity_matches_transformers(llm) -> None:
    transformers = pytest.importorskip("transformers")
    from frugallm.loading import default_model_path

    path = default_model_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()

    @torch.no_grad()
    def hf_score(ids):
        return ref(torch.tensor([ids])).logits[0].float()

    ours = quality.evaluate(llm.score, llm.tokenizer, model_key="ours", make_reference=None)
    theirs = quality.evaluate(hf_score, llm.tokenizer, model_key="hf", make_reference=None)
    assert ours.predictions == theirs.predictions == 4 * 255
    assert ours.perplexity == pytest.approx(theirs.perplexity, rel=0.005)
