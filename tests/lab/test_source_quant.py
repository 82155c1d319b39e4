"""``bench`` says when the model file is already quantized (issue 16, honest lab): ``--quant int4`` on a Q4_1 GGUF
re-quantizes quantized weights against a reference that is the file dequantized, so it reads nearly lossless."""

from __future__ import annotations

import dataclasses

from frugallm.lab import point_metrics, sweep
from frugallm.lab.peers.frugal import FrugalRunner


def flags(runner: FrugalRunner, quant: str | None) -> list[str]:
    return point_metrics.source_quant_flags(dataclasses.replace(sweep.BenchPoint(), quant=quant), runner)


def test_already_quantized_source_is_flagged(tiny_models) -> None:
    runner = FrugalRunner(str(tiny_models.gguf("llama", "Q4_1")), dtype="float32", device="cpu")
    assert runner.source_quantization is not None and runner.source_quantization.startswith("GGUF Q4_1"), \
        runner.source_quantization
    (flag,) = flags(runner, None)
    assert "already quantized (GGUF Q4_1" in flag and "dequantized" in flag
    (flag,) = flags(runner, "int8")
    assert "--quant int8 re-quantizes quantized weights" in flag


def test_float_source_is_not_flagged(tiny_models) -> None:
    runner = FrugalRunner(str(tiny_models.gguf("llama", "F32")), dtype="float32", device="cpu")
    assert runner.source_quantization is None and flags(runner, "int8") == []
