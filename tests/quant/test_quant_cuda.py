"""Quantized modules and models on a CUDA device (skipped without one)."""

from __future__ import annotations

import copy

import pytest
import torch

from frugallm.quant import kernels, quantize_model
from quant_models import BOUNDS, IDS, INPUTS, SPEC_SHAPES, TinyLM, build, gaussian_linear, rel_err, tiny_lm_pair


@pytest.fixture(scope="module")
def tiny_models() -> dict[bool, TinyLM]:
    return tiny_lm_pair()


# ------------------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("spec", "shape"), SPEC_SHAPES)
def test_cuda_module_matches_reference(spec: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    out_f, in_f = shape
    lin = gaussian_linear(out_f, in_f).cuda()
    mod = build(spec, lin.to(dtype))
    if spec.startswith("int4") and out_f % 8 == 0 and "int4_cuda" in kernels.INT4_LAYOUTS:
        assert mod.layout in ("int4_cuda", "packed")
    ys, refs = [], []
    for lead in INPUTS:
        x = torch.randn(*lead, in_f, device="cuda")
        with torch.no_grad():
            y = mod(x.to(dtype))
            ref = lin.float()(x)
        assert y.dtype == dtype and y.device.type == "cuda"
        ys.append(y.reshape(-1))
        refs.append(ref.reshape(-1))
    # half-precision weights and activations add ~0.5% on top of the quantization error
    assert rel_err(torch.cat(ys), torch.cat(refs)) < BOUNDS[spec] + 0.006


@cuda
def test_cuda_int4_kernel_and_move_between_devices() -> None:
    lin = gaussian_linear(128, 192)
    mod = build("int4:group=32", lin)
    assert mod.layout == "int4_cpu"
    x = torch.randn(5, 192)
    y_cpu = mod(x)
    mod = mod.cuda()
    y_gpu = mod(x.cuda())  # re-lays the weights out for the CUDA kernel on first use
    assert mod.layout in ("int4_cuda", "packed")
    assert rel_err(y_gpu.cpu(), y_cpu) < 0.01
    assert torch.equal(mod.dequantize().cpu(), build("int4:group=32", lin).dequantize())
    rows = torch.tensor([0, 9, 127], device="cuda")
    assert torch.allclose(mod.dequantize_rows(rows), mod.dequantize()[rows], atol=1e-6)
    mod = mod.cpu()
    assert rel_err(mod(x), y_cpu) < 1e-6 and mod.layout == "int4_cpu"


@cuda
def test_cuda_int8_int8_mm_exact() -> None:
    for m in (1, 17):
        a = torch.randint(-127, 128, (m, 2048), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (40, 2048), dtype=torch.int8, device="cuda")
        exact = (a.double() @ b.double().t()).to(torch.int32)
        assert torch.equal(kernels.int8_int8_mm(a, b), exact)
    a = torch.randint(-127, 128, (3, 100), dtype=torch.int8, device="cuda")  # K % 8 != 0: emulation
    b = torch.randint(-127, 128, (7, 100), dtype=torch.int8, device="cuda")
    assert torch.equal(kernels.int8_int8_mm(a, b), (a.double() @ b.double().t()).to(torch.int32))


@cuda
@pytest.mark.parametrize("spec", ["int4:group=32:embed", "int8:embed:head", "llm.int8", "mix4:group=32"])
def test_cuda_quantize_model(tiny_models: dict, spec: str) -> None:
    base = copy.deepcopy(tiny_models[True]).cuda().half()
    ids = IDS.cuda()
    model = quantize_model(copy.deepcopy(base), spec)
    with torch.no_grad():
        assert rel_err(model(ids), base(ids)) < 0.12
