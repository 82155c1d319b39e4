"""LoRA adapters over HTTP: ``model`` selects one, ``/v1/models`` lists them with ``parent``, load / unload behind
the API key, bad adapters and names answered 400 / 404 naming them; and ``frugallm generate --lora``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from peft_adapters import VARIANTS, make_adapter

from frugallm import LLM, SamplingParams
from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.serve.app import create_app

pytest.importorskip("peft")
KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def paths(tiny_models, tmp_path_factory):
    ref = tiny_models.hf_reference("llama")
    root = tmp_path_factory.mktemp("served")
    return {n: make_adapter(ref, root / n, seed=20 + i, **VARIANTS[n]) for i, n in enumerate(("lora", "dora"))}


@pytest.fixture(scope="module")
def llm(tiny_models, paths) -> LLM:
    return LLM(tiny_models.hf("llama"), dtype="float32", device="cpu", lora={"sql": paths["lora"]}, max_loras=2,
               max_lora_rank=4)


@pytest.fixture(scope="module")
def client(llm) -> Iterator[TestClient]:
    engine = LLMEngine(llm, EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8))
    with TestClient(create_app(AsyncLLM(engine).start(), "tiny", api_key=KEY)) as c:
        yield c


def _complete(client: TestClient, model: str, prompt: list[int]) -> dict:
    r = client.post("/v1/completions", headers=AUTH,
                    json={"model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0})
    return {"status": r.status_code, **r.json()}


def test_model_field_selects_the_adapter(client, llm, paths) -> None:
    prompt = [5, 17, 30, 9, 44, 12]
    greedy = SamplingParams(max_tokens=5, temperature=0)
    base, sql = _complete(client, "tiny", prompt), _complete(client, "sql", prompt)
    assert sql["model"] == "sql" and base["model"] == "tiny"
    assert sql["choices"][0]["text"] == llm.generate(prompt, greedy, lora="sql")[0].text
    assert base["choices"][0]["text"] == llm.generate(prompt, greedy)[0].text
    assert sql["choices"][0]["text"] != base["choices"][0]["text"]
    cards = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert cards["sql"]["parent"] == "tiny" and cards["sql"]["root"] == str(paths["lora"])
    assert client.get("/v1/models/sql", headers=AUTH).json()["parent"] == "tiny"


def test_load_and_unload(client, llm, paths, tmp_path) -> None:
    body = {"lora_name": "dora", "lora_path": str(paths["dora"])}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 401  # behind the API key
    r = client.post("/v1/load_lora_adapter", headers=AUTH, json=body)
    assert r.status_code == 200 and "dora" in r.text
    prompt = [7, 8, 9, 10, 11]
    assert _complete(client, "dora", prompt)["choices"][0]["text"] == llm.generate(
        prompt, SamplingParams(max_tokens=5, temperature=0), lora="dora")[0].text
    again = client.post("/v1/load_lora_adapter", headers=AUTH, json=body)
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    r = client.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "dora"})
    assert r.status_code == 200
    gone = _complete(client, "dora", prompt)
    assert gone["status"] == 404 and "'dora' does not exist; available: tiny, sql" in gone["error"]["message"]
    r = client.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "dora"})
    assert r.status_code == 404 and "unknown LoRA adapter 'dora'" in r.json()["error"]["message"]


def test_bad_adapters_are_400_naming_them(client, tiny_models, tmp_path) -> None:
    make_adapter(tiny_models.hf_reference("llama", hidden_size=96), tmp_path / "other", seed=1, r=2,
                 target_modules=["v_proj"])
    big = make_adapter(tiny_models.hf_reference("llama"), tmp_path / "big", seed=1, r=8, target_modules=["q_proj"])
    cfg = json.loads((big / "adapter_config.json").read_text())
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    cases = {"other": "does not match the base model", "big": "rank 8, above max_lora_rank 4",
             "ia3": "unsupported PEFT variant 'IA3'", "missing": "is not a folder"}
    for name, msg in cases.items():
        r = client.post("/v1/load_lora_adapter", headers=AUTH,
                        json={"lora_name": name, "lora_path": str(tmp_path / name)})
        assert r.status_code == 400 and msg in r.json()["error"]["message"], (name, r.text)


def test_generate_cli_with_lora(tiny_models, paths) -> None:
    llm = LLM(tiny_models.hf("llama"), dtype="float32", device="cpu", lora={"a": paths["lora"]})
    want = llm.generate("hello world", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), lora="a")[0]
    out = subprocess.run([sys.executable, "-m", "frugallm.cli", "generate", "hello world", "--model",
                          str(tiny_models.hf("llama")), "--dtype", "float32", "--device", "cpu", "-n", "4",
                          "--ignore-eos", "--json", "--lora", str(paths["lora"])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"] == want.token_ids
