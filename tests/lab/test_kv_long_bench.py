"""benchmarks/kv_long_bench.py: one shared prefill feeds every cache exactly; records merge and resume."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from frugallm.kv import build_kv_cache, select_prompt_tokens
from kv_inputs import make_model

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "kv_long_bench.py"
_spec = importlib.util.spec_from_file_location("kv_long_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["kv_long_bench"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)

SPECS = ["full", "snapkv:budget=0.25,window=8", "h2o:budget=0.25", "kivi:bits=2,residual=8,group=8",
         "gemfilter:budget=0.5,layer=1"]


@pytest.fixture(scope="module")
def llm() -> SimpleNamespace:
    model = make_model()
    return SimpleNamespace(model=model, device=torch.device("cpu"), config=model.config)


@torch.inference_mode()
def test_shared_prefill_equals_one_prefill_per_policy(llm):
    ids = [int(i) for i in torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(2))]
    states = bench.prefill(llm, SPECS, ids, 4, torch.float32)
    for spec in SPECS:
        prompt = select_prompt_tokens(spec, llm.model, ids) or ids
        cache = build_kv_cache(spec, llm.model, batch=1, capacity=len(prompt) + 4, dtype=torch.float32,
                               device="cpu")
        logits = llm.model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, "last")[0]
        st = states[spec]
        assert st.pos == len(prompt) and st.kv_prefill == cache.nbytes() and st.ttft_s > 0
        torch.testing.assert_close(st.logits, logits)
        for tok in (5, 7):  # decoding through the shared-prefill cache matches too
            got = bench.step(llm, st, [tok])[-1]
            want = llm.model(torch.tensor([[tok]]), torch.tensor([[st.pos - 1]]), cache, "last")[0]
            torch.testing.assert_close(got, want)


def test_report_merges_records_and_a_rerun_replaces_them(tmp_path):
    def rec(spec: str, correct: bool, **kw) -> dict:
        return {"kind": "passkey", "context": 64, "spec": spec, "depth": 0.5, "trial": 0, "correct": correct,
                "ttft_s": 2.0 if spec == "full" else 1.0, "decode_s": [0.1], "kv_prefill": 10, "fp16_prefill": 20,
                "load": 1.0, **kw}

    tail = {"kind": "tail", "context": 64, "spec": "full", "nll": 1.0, "argmax": [1, 2], "kv_end": 4,
            "fp16_end": 2, "load": 1.0}
    path = tmp_path / "r.jsonl"
    lines = [rec("full", True), rec("snapkv:budget=0.25", False), tail, rec("snapkv:budget=0.25", True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    recs = bench.load_records(path)
    assert len(bench.latest(recs)) == 3
    table = bench.report(recs)
    assert "| 64 | full | 0.500 | 1.000 | 2.718 | +0.0% | 1.000 | 1/1 | 1.00 | 2.00 | 1.00 | 10.00 | 1.00 | 1.0 |" \
        in table
    assert "| 64 | snapkv:budget=0.25 | 0.500 | 1.000 | - | - | - | 1/1 | 1.00 | 1.00 | 2.00 |" in table
    assert bench.parse_plan("2048:5x2,8192:3") == [(2048, 5, 2), (8192, 3, 1)]


def test_needle_recall_is_one_share_per_layer(llm):
    tok = SimpleNamespace(decode=lambda ids: "".join(str(i % 10) if i < 20 else "x" for i in ids))
    ids = [int(i) for i in torch.randint(20, 97, (60,), generator=torch.Generator().manual_seed(3))]
    ids[30:33] = [11, 12, 13]  # the "key" digits
    prompt = bench.passkey.PasskeyPrompt(ids, "123", 0.5, 0.5, 29, 5)
    recall = bench.needle_recall(SimpleNamespace(**vars(llm), tokenizer=tok), prompt, last=1)
    assert len(recall) == 2 and all(r in (0.0, 1 / 3, 2 / 3, 1.0) for r in recall)


def test_report_counts_needles_per_haystack_and_depth(tmp_path):
    def rec(spec: str, stack: str, depth: float, trial: int, correct: bool) -> dict:
        return {"kind": "passkey", "context": 64, "spec": spec, "haystack": stack, "depth": depth, "trial": trial,
                "correct": correct, "ttft_s": 1.0, "decode_s": [0.1], "kv_prefill": 10, "fp16_prefill": 20,
                "load": 1.0}

    lines = [rec(spec, stack, d, t, not (spec != "full" and stack == "code" and d == 0.75))
             for spec in ("full", "snapkv:budget=0.25") for stack in ("prose", "code") for d in (0.25, 0.75)
             for t in range(5)]
    recs = [*lines, {**lines[0], "haystack": "repeat"}]  # another haystack is another needle, not a rerun
    assert len(bench.latest(recs)) == len(lines) + 1
    table = bench.report(lines)
    assert "| 64 | full | 0.500 | 1.000 | - | - | - | 20/20 |" in table
    assert "| 64 | snapkv:budget=0.25 | 0.500 | 1.000 | - | - | - | 15/20 | 0.75 |" in table
    assert "| 64 | snapkv:budget=0.25 | prose: 10/10, code: 5/10 | 0.25: 10/10 0.75: 5/10 |" in table
