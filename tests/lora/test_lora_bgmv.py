"""The native multi-LoRA kernel (csrc/lora_bgmv.cpp) against a float64 reference and against the torch path.

Marked ``isa``: ``make test`` reruns this module at ``FRUGALLM_ISA=avx2``; ``test_every_isa_variant`` runs it at
every other level this CPU executes, so the AVX2, AVX-512 and AVX-512-BF16 builds are all checked here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frugallm import cpu, native
from frugallm.lora import punica
from frugallm.lora.adapter import LoraWeights
from frugallm.lora.layer import LoraContext, LoraLinear
from frugallm.lora.punica import TILE, LoraBatch, bgmv_native, tile_b, tiles

_WHY_NOT = ("native kernels are off (FRUGALLM_NATIVE=0)" if not native.enabled() else
            f"lora_bgmv is not built here (needs {native.required_level('lora_bgmv')}, this CPU runs {cpu.level()}, "
            "or no compiler)")
pytestmark = [pytest.mark.isa, pytest.mark.skipif(not native.usable("lora_bgmv"), reason=_WHY_NOT)]


def pools(parts: list[int], n_in: int, slots: int, rank: int, dtype: torch.dtype, g: torch.Generator):
    """Random pools: ``a [P, S*r, in]``, ``b [S*r, out]`` (k-major), ``b`` as the kernel's tiles, ranks ``[S, P]``
    in ``[0, rank]`` (zero-padded rows past each rank, as ``LoraLinear.place`` leaves them)."""
    a = torch.randn(len(parts), slots * rank, n_in, generator=g) / n_in**0.5
    b = torch.randn(slots * rank, sum(parts), generator=g) * 0.1
    ranks = torch.randint(0, rank + 1, (slots, len(parts)), generator=g, dtype=torch.int32)
    ranks[0] = rank  # the full pool rank is always exercised
    tile0 = tiles(parts)
    b_tiles = torch.zeros(slots, tile0[-1], rank, TILE)
    for s in range(slots):
        for p, off in enumerate(sum(parts[:j]) for j in range(len(parts))):
            r = int(ranks[s, p])
            a[p, s * rank + r : (s + 1) * rank] = 0
            b[s * rank + r : (s + 1) * rank, off : off + parts[p]] = 0
            b_tiles[s, tile0[p] : tile0[p + 1]] = tile_b(b[s * rank : (s + 1) * rank, off : off + parts[p]].T, rank)
    return a.to(dtype), b.to(dtype), b_tiles.to(dtype), ranks


def reference(y, x, a, b, index, ranks, parts, dora=None, bias=None) -> torch.Tensor:
    """The product in float64, row by row, slot by slot (what the kernel must equal)."""
    out = y.double().clone()
    slots, rank = ranks.shape[0], a.shape[1] // ranks.shape[0]
    offsets = [sum(parts[:j]) for j in range(len(parts))]
    for m, s in enumerate(index.tolist()):
        if not 0 <= s < slots:
            continue
        if dora is not None:
            bv = bias.double() if bias is not None else torch.zeros(out.shape[1], dtype=torch.float64)
            out[m] = (out[m] - bv) * dora[s].double() + bv
        for p, (off, n) in enumerate(zip(offsets, parts, strict=True)):
            r = int(ranks[s, p])
            t = a[p, s * rank : s * rank + r].double() @ x[m].double()
            out[m, off : off + n] += t @ b[s * rank : s * rank + r, off : off + n].double()
    return out


CASES = [  # parts, in, slots, pool rank, rows
    ([576, 192, 192], 576, 8, 16, 8),  # SmolLM2's fused q/k/v, 8 rows on 8 adapters
    ([37], 53, 3, 1, 5),  # odd sizes (vector tails), rank 1
    ([29, 70], 131, 4, 64, 9),  # rank 64, odd parts
    ([100], 40, 2, 7, 33),  # rank not a multiple of 4, many rows (a prefill chunk)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"parts{c[0]}-in{c[1]}-S{c[2]}-r{c[3]}-M{c[4]}")
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16,) * 3,
                                    (torch.float32, torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.float32, torch.bfloat16)],
                         ids=["f32", "bf16", "x32-pool16-y32", "x16-pool32-y16"])
@pytest.mark.parametrize("dora", [False, True])
def test_kernel_matches_reference(case, dtypes, dora: bool) -> None:
    parts, n_in, slots, rank, rows = case
    x_dtype, pool_dtype, y_dtype = dtypes
    g = torch.Generator().manual_seed(sum(parts) + n_in + rank + dora)
    a, b, b_tiles, ranks = pools(parts, n_in, slots, rank, pool_dtype, g)
    x = torch.randn(rows, n_in, generator=g).to(x_dtype)
    # Every slot, then rows with none (index S, as bind writes, and -1), then random slots.
    index = torch.cat([torch.arange(slots), torch.tensor([slots, -1]),
                       torch.randint(0, slots + 1, (rows,), generator=g)])[:rows].contiguous()
    scale = 1 + 0.3 * torch.rand(slots + 1, sum(parts), generator=g) if dora else None
    bias = torch.randn(sum(parts), generator=g) if dora else None
    # y as a column slice of a wider tensor: rows are strided, as a fused output's slice would be.
    wide = torch.randn(rows, sum(parts) + 5, generator=g).to(y_dtype)
    y = wide[:, 2 : 2 + sum(parts)]
    want = reference(y, x, a, b, index, ranks, parts, scale, bias)
    before = wide.clone()
    bgmv_native(y, x, a, b_tiles, index, ranks, parts, scale, bias)
    tol = dict(atol=2e-5, rtol=2e-5) if y_dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(y.double(), want, **tol)
    none = (index < 0) | (index >= slots)
    torch.testing.assert_close(y[none], before[:, 2 : 2 + sum(parts)][none], atol=0, rtol=0)  # untouched
    torch.testing.assert_close(wide[:, :2], before[:, :2], atol=0, rtol=0)  # outside the slice: untouched
    torch.testing.assert_close(wide[:, -3:], before[:, -3:], atol=0, rtol=0)


def test_kernel_rejects_bad_operands() -> None:
    g = torch.Generator().manual_seed(0)
    a, _, b, ranks = pools([8, 8], 16, 2, 4, torch.float32, g)
    x, y, index = torch.randn(3, 16), torch.zeros(3, 16), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="parts sum to 12"):
        bgmv_native(y, x, a, b, index, ranks, [8, 4])
    with pytest.raises(RuntimeError, match="index must be"):
        bgmv_native(y, x, a, b, index.int(), ranks, [8, 8])
    with pytest.raises(RuntimeError, match="a_pool must be"):
        bgmv_native(y, torch.randn(3, 15), a, b, index, ranks, [8, 8])
    with pytest.raises(RuntimeError, match="b_tiles must be"):
        bgmv_native(y, x, a, b[:, :1], index, ranks, [8, 8])
    with pytest.raises(RuntimeError, match="ranks must be in"):
        bgmv_native(y, x, a, b, index, ranks + 5, [8, 8])
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16"):
        bgmv_native(y.half(), x, a, b, index, ranks, [8, 8])


def _linear(parts: list[int], n_in: int, slots: int, rank: int, dtype: torch.dtype, bias: bool, seed: int,
            device: str = "cpu"):
    """A ``LoraLinear`` over a random ``nn.Linear`` with adapters of mixed ranks and parts (slot 1 is DoRA)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the base's init
    base = torch.nn.Linear(n_in, sum(parts), bias=bias).requires_grad_(False).to(dtype).to(device)
    lin = LoraLinear(base, n_in, parts, slots, rank, dtype, LoraContext())
    for s in range(slots - 1):  # the last slot stays empty
        factors = {}
        for j, n in enumerate(parts):
            if (s + j) % 3 == 2:
                continue  # this adapter leaves part j alone
            r = 1 + (s * 5 + j) % rank
            mag = 1 + 0.3 * torch.rand(n, generator=g) if s == 1 else None
            factors[j] = LoraWeights(torch.randn(r, n_in, generator=g) * 0.2, torch.randn(n, r, generator=g) * 0.2,
                                     mag)
        lin.place(s, factors)
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_native_equals_torch_path(monkeypatch, dtype: torch.dtype, bias: bool) -> None:
    """``LoraLinear`` on the kernel and on the torch path (the one CUDA runs; its own ``B`` layout) give the same
    outputs, for decode rows ([M, in], through ``decode_fn`` too) and prefill ([B, T, in]), rows on every slot, an
    empty slot and none, with a DoRA slot; fp16 activations go through the kernel in fp32."""
    lin = _linear([24, 70, 8], 32, 4, 8, dtype, bias, seed=int(bias))
    monkeypatch.setattr(punica, "native_pools", lambda device, dtype: False)
    ref = _linear([24, 70, 8], 32, 4, 8, dtype, bias, seed=int(bias))
    monkeypatch.undo()
    assert lin.native and not ref.native
    index = torch.tensor([0, 1, 2, 4, 1, 3, 0])  # 4: no adapter; 3: the empty slot
    mask = torch.zeros(len(index), 4, dtype=dtype)
    mask[torch.arange(len(index))[index < 4], index[index < 4]] = 1
    lin.ctx.batch = ref.ctx.batch = LoraBatch(mask, index, 0, 4, dora=True)
    g = torch.Generator().manual_seed(7)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    with torch.inference_mode():
        for shape in [(7, 32), (1, 7, 32)]:
            x = torch.randn(*shape, generator=g).to(dtype)
            got, want, base = lin(x), ref(x), lin.base(x)
            torch.testing.assert_close(got, want, **tol)
            rows, base = got.reshape(-1, 102), base.reshape(-1, 102)
            assert (rows[index < 3] - base[index < 3]).abs().max() > 0.1  # the adapters did something
            torch.testing.assert_close(rows[index >= 3], base[index >= 3], **tol)
        x = torch.randn(7, 32, generator=g).to(dtype)
        torch.testing.assert_close(lin.decode_fn(dtype, x.device)(x), ref(x), **tol)
        if dtype == torch.float32:  # a model run in fp16 on CPU: pools fp32, activations cast
            lin.base.half()
            torch.testing.assert_close(lin(x.half()).float(), ref(x), atol=2e-2, rtol=1e-2)


def test_clear_zeroes_a_slot() -> None:
    lin = _linear([16, 16], 16, 3, 4, torch.float32, False, seed=3)
    assert lin.native
    x = torch.randn(2, 16)
    lin.ctx.batch = LoraBatch(torch.eye(3)[[1, 1]], torch.tensor([1, 1]), 0, 3, dora=True)
    with torch.inference_mode():
        assert (lin(x) - lin.base(x)).abs().max() > 0.1
        lin.clear(1)
        torch.testing.assert_close(lin(x), lin.base(x), atol=0, rtol=0)
    assert int(lin.ranks[1].abs().sum()) == 0 and not lin.b_pool[1].any() and not lin.a_pool[:, 4:8].any()
    assert lin.b_pool[0].any() and lin.ranks[0].all()  # the other slots keep their factors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the torch path runs there)")
def test_cuda_torch_path_equals_cpu_kernel() -> None:
    lin = _linear([24, 70, 8], 32, 4, 8, torch.float32, True, seed=5)
    ref = _linear([24, 70, 8], 32, 4, 8, torch.float32, True, seed=5, device="cuda")
    assert lin.native and not ref.native
    index = torch.tensor([0, 1, 2, 4, 1, 3, 0])
    mask = torch.zeros(len(index), 4)
    mask[torch.arange(len(index))[index < 4], index[index < 4]] = 1
    lin.ctx.batch = LoraBatch(mask, index, 0, 4, dora=True)
    ref.ctx.batch = LoraBatch(mask.cuda(), index.cuda(), 0, 4, dora=True)
    x = torch.randn(7, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ref(x.cuda()).cpu(), lin(x), atol=1e-4, rtol=1e-4)


LOWER = [lvl for lvl in cpu.LEVELS[1:] if cpu.LEVELS.index(lvl) <= cpu.LEVELS.index(cpu.hardware_level())
         and lvl != cpu.level()]


@pytest.mark.skipif(os.environ.get("FRUGALLM_ISA") not in (None, "", "native"), reason="run at the native level")
@pytest.mark.parametrize("level", LOWER or [None])
def test_every_isa_variant(level: str | None) -> None:
    """This module's kernel tests again, in a process built for each other ISA level this CPU executes."""
    if level is None:
        pytest.skip(f"this CPU runs only {cpu.level()}")
    env = {**os.environ, "FRUGALLM_ISA": level}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "kernel or layer or clear"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
