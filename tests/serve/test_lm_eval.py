"""lm-eval's ``local-completions`` against the server: a loglikelihood task (multiple choice, written here as
JSONL; nothing is downloaded) scores the same as the in-process computation with ``LLM.score``.

lm-eval tokenizes through the server (``tokenizer_backend=remote``: ``/tokenizer_info``, ``/tokenize``) and
scores with ``echo`` + ``logprobs`` on ``/v1/completions``, as it does against vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from frugallm import LLM
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.serve.app import create_app

lm_eval = pytest.importorskip("lm_eval")

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"context": "The cat sat on the", "choices": ["mat", "moon", "idea"], "gold": 0},
    {"context": "Water boils at one hundred", "choices": ["degrees", "apples", "miles"], "gold": 0},
    {"context": "She opened the door and", "choices": ["walked in", "blue sky", "seven"], "gold": 0},
    {"context": "Two plus two equals", "choices": ["four", "five", "a tree"], "gold": 0},
    {"context": "The sun rises in the", "choices": ["east", "west", "soup"], "gold": 0},
    {"context": "def add(a, b): return", "choices": ["a + b", "a * b", "None"], "gold": 0},
    {"context": "Paris is the capital of", "choices": ["France", "Spain", "Mars"], "gold": 0},
    {"context": "I like to drink", "choices": ["coffee", "rocks", "silence"], "gold": 0},
]

TASK_YAML = """task: frugallm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


def in_process(llm: LLM) -> tuple[float, list[list[float]]]:
    """lm-eval's loglikelihood recipe computed with ``LLM.score``: the continuation is `` choice``, tokenized as
    ``whole[len(context):]`` (lm-eval's ``_encode_pair``), summed log-probabilities of its tokens."""
    tok = llm.tokenizer
    lls, correct = [], 0
    for d in DOCS:
        ctx = tok.encode(d["context"])
        row = []
        for c in d["choices"]:
            ids = tok.encode(d["context"] + " " + c)
            lp = llm.score(ids).log_softmax(-1)
            row.append(sum(float(lp[j - 1, ids[j]]) for j in range(len(ctx), len(ids))))
        lls.append(row)
        correct += int(torch.tensor(row).argmax()) == d["gold"]
    return correct / len(DOCS), lls


def test_lm_eval_local_completions_matches_in_process(tiny_models: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from live_server import UvicornThread

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = LLM(str(tiny_models.hf("llama")), dtype="float32", device="cpu")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=data))
    app = create_app(AsyncLLM(LLMEngine(llm, EngineConfig(num_blocks=256, block_size=4))).start(), "tiny")
    with UvicornThread(app) as server:
        res = simple_evaluate(
            model="local-completions",
            model_args={"model": "tiny", "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "remote",
                        "num_concurrent": 2, "max_retries": 1, "max_length": 200},
            tasks=["frugallm_tiny_mc"], log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        )
    acc, want = in_process(llm)
    assert res["results"]["frugallm_tiny_mc"]["acc,none"] == pytest.approx(acc, abs=1e-9)
    samples = sorted(res["samples"]["frugallm_tiny_mc"], key=lambda s: s["doc_id"])
    got = [[r[0][0] for r in s["resps"]] for s in samples]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-3)
