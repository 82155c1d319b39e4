"""One-shot CUDA check: correctness of the same code paths on GPU, plus decode/prefill speed vs transformers.

Run on a machine with a GPU (no model download: tiny and SmolLM2-shaped random models are built here):
    python benchmarks/gpu_check.py
Each section prints one JSON line; a failing section prints its error and the others still run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # "cpu" dry-runs the script logic


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def section(name):
    def deco(fn):
        def run(*a):
            t0 = time.perf_counter()
            try:
                res = fn(*a)
                print(json.dumps({"section": name, "ok": True, "s": round(time.perf_counter() - t0, 2), **res}))
            except Exception as e:  # report and go on: this is a diagnostic script
                traceback.print_exc()
                print(json.dumps({"section": name, "ok": False, "error": f"{type(e).__name__}: {e}"}))
            sys.stdout.flush()

        return run

    return deco


@section("parity")
def parity(tmp: Path) -> dict:
    import tiny_models as tm
    from frugallm import LLM, SamplingParams

    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        hf = tm.make_hf_model(tmp / f"hf-{arch}", arch)
        g = tm.make_gguf(hf, tmp / f"{arch}.gguf", tensor_type="Q8_0")
        cpu = LLM(str(g), dtype="float32", device="cpu")
        ids = cpu.tokenizer.encode(tm.MIXED_TEXT)[:64]
        ref = cpu.score(ids)
        for dt in ("float32", "bfloat16", "float16"):
            gpu = LLM(str(g), dtype=dt, device=DEV)
            lg = gpu.score(ids).cpu()
            out[f"{arch}_{dt}_maxdiff"] = float((lg - ref).abs().max())
            out[f"{arch}_{dt}_agree"] = float((lg.argmax(-1) == ref.argmax(-1)).float().mean())
        gpu = LLM(str(g), dtype="float32", device=DEV)
        p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        prompts = ["a", "the quick brown fox", "hello there how are you"]
        batched = [o.token_ids for o in gpu.generate(prompts, p)]
        single = [gpu.generate([q], p)[0].token_ids for q in prompts]
        cpu_b = [o.token_ids for o in cpu.generate(prompts, p)]
        out[f"{arch}_batch_eq_single"] = batched == single
        out[f"{arch}_gpu_eq_cpu"] = batched == cpu_b
        s = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
        out[f"{arch}_seeded_repeat"] = gpu.generate(["x"], s)[0].token_ids == gpu.generate(["x"], s)[0].token_ids
        out[f"{arch}_stream_eq"] = "".join(gpu.stream("hello", p)) == gpu.generate(["hello"], p)[0].text
    return out


@section("techniques")
def techniques(tmp: Path) -> dict:
    import tiny_models as tm
    from frugallm import LLM, SamplingParams

    hf = tm.make_hf_model(tmp / "hf-tech", "llama", hidden_size=128, intermediate_size=256)
    out = {}
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompt = tm.MIXED_TEXT[:200]
    for q in ("int8", "llm.int8", "int4:group=32", "int3:group=32", "mix4"):
        llm = LLM(str(hf), dtype="bfloat16", device=DEV, quant=q)
        o = llm.generate([prompt], p)[0]
        out[f"quant_{q}"] = {"tokens": len(o.token_ids), "weight_bytes": llm.weight_bytes()}
    for kv in (
        "kivi:bits=2",
        "snapkv:budget=0.25",
        "h2o:budget=0.25",
        "streamingllm:budget=0.25",
        "snapkv:budget=0.25+kivi:bits=2",
        "gemfilter:budget=0.5",
        "xquant:bits=4",
        "think:ratio=0.5",
    ):
        llm = LLM(str(hf), dtype="bfloat16", device=DEV, kv=kv)
        o = llm.generate([prompt, prompt[:100]], p)
        out[f"kv_{kv}"] = {"tokens": [len(x.token_ids) for x in o], "kv_bytes": o[0].metrics.get("kv_cache_bytes")}
    return out


def _smollm_shaped(tmp: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    import tiny_models as tm

    d = tmp / "smollm-shaped"
    tm.make_tokenizer_json(d)
    vocab = 49152
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(d, safe_serialization=True)
    return d


@section("speed")
def speed(tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from frugallm import LLM, SamplingParams

    d = _smollm_shaped(tmp)
    out = {"gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__}
    ids = torch.randint(100, 300, (1000,)).tolist()
    for dt in ("bfloat16", "float16"):
        llm = LLM(str(d), dtype=dt, device=DEV)
        p = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
        llm.generate([ids[:16]], p)
        tp = sorted(llm.generate([ids[:16]], p)[0].metrics["tpot_s"] for _ in range(3))[1]
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        llm.generate([ids], one)
        sync()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            llm.generate([ids], one)
            sync()
            ts.append(time.perf_counter() - t0)
        out[f"frugallm_{dt}_decode_tok_s"] = round(1 / tp, 1)
        out[f"frugallm_{dt}_prefill1000_tok_s"] = round(1000 / sorted(ts)[1], 1)
        b16 = llm.generate([ids[:128]] * 16, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
        out[f"frugallm_{dt}_batch16_tok_s"] = round(16 * 64 / max(o.metrics["e2e_s"] for o in b16), 1)
    for q in ("int8", "int4:group=32", "int4:group=32:head=8"):
        llm = LLM(str(d), dtype="bfloat16", device=DEV, quant=q)
        p = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
        llm.generate([ids[:16]], p)
        tp = sorted(llm.generate([ids[:16]], p)[0].metrics["tpot_s"] for _ in range(3))[1]
        out[f"frugallm_bf16_{q}_decode_tok_s"] = round(1 / tp, 1)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(DEV).eval()
    x = torch.tensor([ids[:16]], device=DEV)
    with torch.no_grad():
        hf.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        sync()
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
        sync()
    out["transformers_bf16_decode_tok_s"] = round(128 / (time.perf_counter() - t0), 1)
    return out


@section("compiled")
def compiled(tmp: Path) -> dict:
    """``LLM(compile=True)`` on CUDA, and the same halves replayed as CUDA graphs (``reduce-overhead``)."""
    from frugallm import LLM, SamplingParams

    d = tmp / "smollm-shaped"
    ids = torch.randint(100, 300, (16,)).tolist()
    p = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    eager = LLM(str(d), dtype="bfloat16", device=DEV)
    ref = eager.generate([ids], p)[0].token_ids
    out: dict = {}
    for name, mode in (("eager", None), ("compiled", "default"), ("graphs", "reduce-overhead")):
        try:
            llm = eager if mode is None else LLM(str(d), dtype="bfloat16", device=DEV)
            if mode is not None:
                t0 = time.perf_counter()
                llm.model.compile_decode(None if mode == "default" else mode)
                # bf16: fused kernels round differently, so greedy tokens may part ways (fp32 is tested equal)
                out[f"{name}_same_tokens"] = llm.generate([ids], p)[0].token_ids == ref
                out[f"{name}_first_run_s"] = round(time.perf_counter() - t0, 1)
            tp = sorted(llm.generate([ids], p)[0].metrics["tpot_s"] for _ in range(3))[1]
            out[f"{name}_bf16_decode_tok_s"] = round(1 / tp, 1)
        except Exception as e:  # report and go on
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


@section("serve_engine")
def serve_engine(tmp: Path) -> dict:
    from frugallm import LLM, SamplingParams
    from frugallm.engine.batched import generate_batched

    d = tmp / "smollm-shaped"
    llm = LLM(str(d), dtype="bfloat16", device=DEV)
    prompts = [torch.randint(100, 300, (128,)).tolist() for _ in range(16)]
    p = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = generate_batched(llm, prompts, [p] * 16)
    dt = time.perf_counter() - t0
    ref = llm.generate([prompts[0]], p)[0].token_ids
    return {"tok_s": round(sum(len(o.token_ids) for o in outs) / dt, 1), "first_eq_single": outs[0].token_ids == ref}


if __name__ == "__main__":
    assert DEV != "cuda" or torch.cuda.is_available(), "no CUDA device"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        parity(t)
        techniques(t)
        speed(t)
        serve_engine(t)
        compiled(t)
