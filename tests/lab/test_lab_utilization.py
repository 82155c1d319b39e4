"""Each phase is bounded by the peak of the dtype it really multiplies in (roofline, MFU, bench records)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from frugallm import cpu
from frugallm.config import ModelConfig
from frugallm.lab.hardware import HardwareSpec
from frugallm.lab.peers.base import Runner
from frugallm.lab.peers.frugal import FrugalRunner
from frugallm.lab.roofline import analyze
from frugallm.lab.utilization import measured_utilization, peak_dtype, point_utilization

TINY = ModelConfig(arch="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128, name="tiny")
# Distinct peaks per dtype, so the peak a phase used shows which dtype it was bounded by.
HW = HardwareSpec("toy", mem_bandwidth_gbs=100.0, peak_flops={"fp32": 1e12, "bf16": 8e12, "fp16": 0.5e12})


def test_prefill_and_decode_each_use_their_compute_dtype() -> None:
    rep = analyze(TINY, HW, 1, 64, 4, compute_dtype="fp16", prefill_compute_dtype="bf16")
    assert (rep.prefill_matmul_dtype, rep.matmul_dtype) == ("bf16", "fp16")
    assert rep.prefill.row("qkv_proj").peak_dtype == "bf16" and rep.decode.row("qkv_proj").peak_dtype == "fp16"
    same = analyze(TINY, HW, 1, 64, 4, compute_dtype="fp16")
    assert same.prefill_matmul_dtype == "fp16" and same.decode == rep.decode and same.prefill != rep.prefill
    u = measured_utilization(TINY, HW, 1, 64, 4, tpot_s=1e-3, ttft_s=1e-2, compute_dtype="fp16",
                             prefill_compute_dtype="bf16")
    assert (u["prefill_peak_flops"], u["peak_flops"]) == (8e12, 0.5e12)
    assert u["prefill_mfu"] == pytest.approx(rep.prefill.flops / 1e-2 / 8e12)
    assert u["decode_mfu"] == pytest.approx(rep.decode.flops / 1e-3 / 0.5e12)


class _PhaseRunner(Runner):
    """fp16 weights that prefill in bf16 and decode in fp16, like frugallm on an AVX512-BF16 CPU."""

    dtype, device = "float16", "cpu"

    def compute_dtype(self, tokens: int) -> str:
        return "bfloat16" if tokens >= 16 else "float16"


def test_point_utilization_bounds_each_phase_by_its_dtype() -> None:
    kv_bytes = 2 * TINY.num_layers * TINY.kv_size * 2 * (32 + 4 - 1) * 2
    metrics, roofline = point_utilization(TINY, HW, _PhaseRunner(), 2, 32, 4, TINY.num_params * 2, kv_bytes,
                                          ttft_s=1e-2, tpot_s=1e-3)
    assert roofline["prefill_compute_dtype"] == "bf16" and roofline["compute_dtype"] == "fp16"
    assert roofline["prefill_peak_flops"] == 8e12 and roofline["peak_flops"] == 0.5e12
    assert metrics["prefill_mfu"] == pytest.approx(roofline["prefill_flops"] / 1e-2 / 8e12)
    assert metrics["decode_mfu"] == pytest.approx(roofline["decode_flops"] / 1e-3 / 0.5e12)
    # A batch of 16 decodes 16 tokens per pass: the engine runs that pass in its prefill dtype.
    _, wide = point_utilization(TINY, HW, _PhaseRunner(), 16, 32, 4, TINY.num_params * 2, None, 1e-2, 1e-3)
    assert wide["compute_dtype"] == "bf16"


def test_peak_dtype_falls_back_to_fp32_when_the_spec_lacks_it() -> None:
    no_bf16 = HardwareSpec("no-bf16", 100.0, {"fp32": 1e12, "fp16": 2e12})
    assert peak_dtype("bfloat16", no_bf16) == "fp32" and peak_dtype("float16", no_bf16) == "fp16"
    assert peak_dtype("gguf", HW) == "fp32"


def _frugal(dtype: torch.dtype, prefill: torch.dtype | None, decode: torch.dtype | None,
            quantized: bool = False) -> FrugalRunner:
    """A FrugalRunner over a stand-in LLM: compute_dtype reads only these attributes."""
    runner = FrugalRunner.__new__(FrugalRunner)
    runner.dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    runner.llm = SimpleNamespace(dtype=dtype, device=torch.device("cpu"), quant_spec=object() if quantized else None,
                                 model=SimpleNamespace(prefill_dtype=prefill, decode_dtype=decode))
    return runner


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_frugal_runner_reports_the_engine_phase_dtypes(monkeypatch, fast_bf16: bool) -> None:
    monkeypatch.setattr(cpu, "fast_bf16", lambda: fast_bf16)
    half = torch.bfloat16 if fast_bf16 else torch.float32  # what LLM sets as an fp16 model's prefill_dtype
    fp16 = _frugal(torch.float16, prefill=half, decode=None)
    assert fp16.compute_dtype(64) == str(half).removeprefix("torch.") and fp16.compute_dtype(1) == "float16"
    assert _frugal(torch.float32, None, None).compute_dtype(64) == "float32"
    # Quantized CPU matmuls run in quant.kernels.compute_dtype: bf16 where it is native, else fp32.
    quant = _frugal(torch.float32, None, None, quantized=True)
    assert quant.compute_dtype(1) == ("bfloat16" if fast_bf16 else "float32")


def test_figures_past_a_ceiling_are_flagged() -> None:
    args = (TINY, HW, _PhaseRunner(), 1, 32, 4, TINY.num_params * 2, None)
    metrics, roofline = point_utilization(*args, ttft_s=1e-2, tpot_s=1e-3)
    assert roofline["flags"] == [] and metrics["decode_mbu"] < 1
    # 1,000x faster than that: decode streams more bytes per second than the memory can deliver.
    fast, roof = point_utilization(*args, ttft_s=1e-8, tpot_s=1e-9)
    assert fast["decode_mbu"] > 1 and fast["tpot_over_predicted"] < 1 and fast["prefill_mfu"] > 1
    decode, prefill = roof["flags"]
    assert decode.startswith("decode: ") and "MBU" in decode and "TPOT" in decode and "roofline" in decode
    assert prefill.startswith("prefill: ") and "MFU (vs the bf16 peak)" in prefill
