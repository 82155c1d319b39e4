"""Thin wrappers over torch's packed low-bit kernels, with the shape and dtype rules found by experiment.

Measured on torch 2.13 (CPU: AMD EPYC with AVX512-BF16, 2 threads; numbers in ``benchmarks/quant_kernels.py``
and the module docstrings of ``int8.py`` and ``group_linear.py``):

* ``torch._weight_int8pack_mm`` and ``torch._weight_int4pack_mm_for_cpu`` accept fp32, fp16 and bf16
  activations on CPU, but only the bf16 path is fast (fp32 is 10-20x and fp16 30x slower than bf16), so
  every CPU quantized matmul computes in bf16 and casts the result back (:func:`compute_dtype`).
* ``_weight_int8pack_mm`` on CPU needs ``in_features % 16 == 0`` (other sizes crash the process, so the
  check here is not optional).
* ``_convert_weight_to_int4pack_for_cpu`` takes int32 codes ``[N, K]`` in ``[0, 16)`` with ``N % 16 == 0`` and
  returns ``uint8 [N, K/2]`` (exactly the packed size); the kernel wants ``scales_and_zeros [K/g, N, 2]`` in
  the activation dtype and computes ``w = (q - 8) * scale + zero``.
* ``torch._int_mm`` (int8 x int8 -> int32) works on CPU for every shape and is exact; on CUDA it needs
  ``M > 16`` and ``K, N`` multiples of 8, so decode rows are zero-padded to 17.
* CUDA (checked on an H200 with torch 2.11): ``_convert_weight_to_int4pack`` takes ``uint8 [N, K/2]``
  (even column in the high nibble) and the tinygemm kernel needs bf16; ``_weight_int8pack_mm`` runs but is
  2-3x slower than fp16 ``F.linear`` even for one row. Each CUDA kernel is probed once per device and
  skipped (dequantize-then-matmul) if it fails.

The int4 kernel layouts are bijective nibble permutations of the codes, in independent blocks of
``row_block`` output rows (64 on CPU, 8 on CUDA). :func:`nibble_permutation` recovers the permutation by
probing the converter, so a module keeps *only* the kernel-layout weight and can still decode single rows
(embedding lookups) or re-layout itself when moved to another device. A layout whose permutation cannot be
recovered is not used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from frugallm import cpu, native
from frugallm.quant.groups import dequant_groups

# int8 x int8 products are < 2**14, so fp32 sums of at most 1024 of them stay below 2**24 and are exact.
_EXACT_FP32_K = 1024


def compute_dtype(device: torch.device, x_dtype: torch.dtype) -> torch.dtype:
    """Dtype the quantized matmuls run in: on CPU bf16 where the CPU computes it natively (see module docstring),
    else fp32 (bf16 is emulated there, ~40x slower); the activation dtype on GPU."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu.fast_bf16() else torch.float32
    return x_dtype


# --------------------------------------------------------------------------------------------- int8 x fp


def int8pack_supported(device: torch.device, in_features: int) -> bool:
    """Whether ``torch._weight_int8pack_mm`` can run a ``[*, in_features]`` input on ``device``."""
    # K % 16 is required on CPU (other sizes crash); kept on CUDA too rather than risk a fault there.
    if not hasattr(torch, "_weight_int8pack_mm") or in_features % 16:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _cuda_probe("int8pack", device))


# Up to this many rows frugallm's native low-bit kernels (csrc/int8_linear.cpp, csrc/mix4_linear.cpp) beat
# the torch paths on CPU (torch._weight_int8pack_mm; dequantize + F.linear for mix4).
NATIVE_QUANT_MAX_ROWS = 16

# GGUF weights as stored (GGUFLinear, exact mode): up to these many rows its native kernels beat dequantize +
# F.linear, which dequantizes the whole weight on every pass (8960x1536 / 1536x8960 Q4_K / Q6_K, 1 thread, loaded
# machine). fp32 activations (decode, verify): the x16 kernels 2.3-3.0x it at 64 rows and 1.3-1.7x at 128-256, the
# stored-block kernel 1.15-1.7x at 64. bf16 activations (the model's prefill dtype from PREFILL_MIN_TOKENS rows on
# AVX512-BF16 CPUs) against the bf16 GEMM: the x16 kernels 1.14-1.35x at 24 rows, 0.96-1.19x at 32, 0.8-0.9x at 48;
# the stored-block kernel loses from ~24 rows (0.88-1.02x), so modules with a stored segment keep
# NATIVE_QUANT_MAX_ROWS there.
GGUF_FP32_MAX_ROWS = 64
GGUF_X16_BF16_MAX_ROWS = 32


def few_rows_kernel(
    op: Callable[..., torch.Tensor], args: tuple, fallback: Callable[[torch.Tensor], torch.Tensor],
    limit: int = NATIVE_QUANT_MAX_ROWS,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``decode_fn``: ``op(x, *args)`` for passes of up to ``limit`` rows, else ``fallback(x)``."""
    return lambda x: op(x, *args) if x.shape[0] <= limit else fallback(x)


def native_kernel(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.ops.frugallm.<name>`` (``csrc/<name>.cpp``) serves bf16 inputs on ``device``."""
    return device.type == "cpu" and dtype == torch.bfloat16 and native.usable(name)


def int8_weight_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ (qweight [N, K] int8 * scales [N])^T -> [M, N]`` with the packed kernel."""
    # The CPU kernel reads raw rows: hand it dense row-major operands whatever the caller's layout.
    if scales.dtype != x.dtype:
        scales = scales.to(x.dtype)
    return torch._weight_int8pack_mm(x.contiguous(), qweight.contiguous(), scales.contiguous())


# ------------------------------------------------------------------------------------------- int8 x int8


def int8_int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] int8 @ b [N, K]^T int8 -> int32 [M, N]``.

    Uses ``torch._int_mm`` where the device and shape allow it (b is passed column-major, 2-3x faster on
    CPU than row-major in our measurements), else a float emulation that stays exact by summing chunks of
    at most 1024 products in fp32 and the chunks in int32.
    """
    m, k = a.shape
    n = b.shape[0]
    if hasattr(torch, "_int_mm"):
        if a.device.type == "cpu":
            return torch._int_mm(a, b.t())
        if a.device.type == "cuda" and k % 8 == 0 and n % 8 == 0 and k >= 16 and _cuda_probe("int_mm", a.device):
            if m <= 16:
                # cuBLASLt int8 GEMM needs M > 16; padding decode rows costs far less than the fallback.
                return torch._int_mm(F.pad(a, (0, 0, 0, 17 - m)), b.t())[:m]
            return torch._int_mm(a, b.t())
    out = torch.zeros(m, n, dtype=torch.int32, device=a.device)
    for k0 in range(0, k, _EXACT_FP32_K):
        part = a[:, k0 : k0 + _EXACT_FP32_K].float() @ b[:, k0 : k0 + _EXACT_FP32_K].float().t()
        out += part.to(torch.int32)
    return out


# -------------------------------------------------------------------------------------------------- int4


class Int4Layout:
    """One device's int4 kernel layout: converter, matmul, and the rules for when it applies.

    ``row_block`` is the number of output rows whose codes occupy one contiguous run of bytes in the
    converted tensor (checked by :func:`block_permutation`), which is what makes row decoding cheap.
    """

    name: str = ""
    device_type: str = ""
    row_block: int = 1
    # The torch op ``(x [M, K] bf16, qweight, group_size, qscale) -> [M, N]``; ``mm`` calls it.
    op: Callable[..., torch.Tensor] | None = None

    def available(self, device: torch.device) -> bool:
        raise NotImplementedError

    def shape_ok(self, out_features: int, in_features: int, group_size: int) -> bool:
        raise NotImplementedError

    def convert(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [N, K]`` (values in [0, 16)) -> kernel-layout weight on the same device."""
        raise NotImplementedError

    def mm(self, x: torch.Tensor, qweight: torch.Tensor, group_size: int, qscale: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` (compute dtype) -> ``[M, N]``; ``qscale`` is ``[K/g, N, 2]`` (scale, zero)."""
        raise NotImplementedError

    def dequantizer(self, k: int) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
        """A fast ``(qweight, qscale, group_size) -> bf16 [N, k]`` for large-M passes, or None."""
        return None


class CpuInt4Layout(Int4Layout):
    name, device_type, row_block = "int4_cpu", "cpu", 64
    op = staticmethod(getattr(torch, "_weight_int4pack_mm_for_cpu", None))

    def available(self, device: torch.device) -> bool:
        return device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu")

    def shape_ok(self, out_features: int, in_features: int, group_size: int) -> bool:
        return out_features % self.row_block == 0 and in_features % group_size == 0

    def convert(self, codes: torch.Tensor) -> torch.Tensor:
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)

    def mm(self, x: torch.Tensor, qweight: torch.Tensor, group_size: int, qscale: torch.Tensor) -> torch.Tensor:
        return self.op(x, qweight, group_size, qscale)

    def dequantizer(self, k: int) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
        # The packed kernel is compute bound at large M (a 512-row pass over a 3072x576 weight: 5.4 ms, against
        # 0.9 ms to dequantize plus 1.8 ms of bf16 GEMM). This layout, as torch 2.13 builds it, stores per
        # 64-row block and input column 32 bytes whose low nibbles are rows 0-31 and high nibbles rows 32-63: a
        # reshape, not a gather, undoes it. Used only where the probed permutation says exactly that.
        return _cpu_dequantize if _cpu_layout_is_blocked(k) else None


@functools.lru_cache(maxsize=64)
def _cpu_layout_is_blocked(k: int) -> bool:
    perm = block_permutation("int4_cpu", k, torch.device("cpu"))
    if perm is None:
        return False
    rows = torch.arange(64).reshape(2, 32).t().reshape(-1)  # nibble 2j -> row j, 2j+1 -> row 32+j
    expected = (rows[None, :] * k + torch.arange(k)[:, None]).reshape(-1)  # nibbles ordered [col, 64]
    return torch.equal(perm, expected)


def _cpu_dequantize(qweight: torch.Tensor, qscale: torch.Tensor, group_size: int) -> torch.Tensor:
    n = qscale.shape[1]
    k = qweight.numel() * 2 // n
    blocks = qweight.view(torch.uint8).reshape(n // 64, k, 32)
    codes = torch.cat((blocks & 0xF, blocks >> 4), -1).transpose(1, 2).reshape(n, k)
    sz = qscale.transpose(0, 1).float()  # [N, G, 2]: w = (q - 8) * scale + zero
    # The arithmetic of GroupQuantLinear.dequantize, so large passes match it bit for bit.
    return dequant_groups(codes, sz[..., 0], sz[..., 1] - 8 * sz[..., 0], 4, group_size, torch.bfloat16)


class CudaInt4Layout(Int4Layout):
    """tinygemm layout (``torch._weight_int4pack_mm``); bf16 only, Ampere or newer."""

    name, device_type, row_block = "int4_cuda", "cuda", 8
    op = staticmethod(getattr(torch, "_weight_int4pack_mm", None))

    def available(self, device: torch.device) -> bool:
        return (
            device.type == "cuda"
            and hasattr(torch, "_weight_int4pack_mm")
            and torch.cuda.get_device_capability(device)[0] >= 8
            and _cuda_probe("int4pack", device)
        )

    def shape_ok(self, out_features: int, in_features: int, group_size: int) -> bool:
        return out_features % self.row_block == 0 and in_features % 32 == 0 and in_features % group_size == 0

    def convert(self, codes: torch.Tensor) -> torch.Tensor:
        k = codes.shape[1]
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
        c = codes.to(torch.uint8)
        packed = (c[:, ::2] << 4) | c[:, 1::2]
        return torch._convert_weight_to_int4pack(packed.contiguous(), inner_k_tiles)

    def mm(self, x: torch.Tensor, qweight: torch.Tensor, group_size: int, qscale: torch.Tensor) -> torch.Tensor:
        return self.op(x, qweight, group_size, qscale)


INT4_LAYOUTS: dict[str, Int4Layout] = {lay.name: lay for lay in (CpuInt4Layout(), CudaInt4Layout())}


def int4_layout_for(device: torch.device, out_features: int, in_features: int, group_size: int) -> Int4Layout | None:
    """The int4 kernel layout usable for this shape on ``device``, or None (dequantize-then-matmul)."""
    for lay in INT4_LAYOUTS.values():
        if (
            lay.available(device)
            and lay.shape_ok(out_features, in_features, group_size)
            and block_permutation(lay.name, in_features, device) is not None
        ):
            return lay
    return None


def to_nibbles(t: torch.Tensor) -> torch.Tensor:
    """Any integer tensor -> its 4-bit nibbles ``[numel * element_size * 2]`` (low nibble of each byte first)."""
    b = t.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1)


def nibble_permutation(
    convert: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, device: torch.device
) -> torch.Tensor | None:
    """Find ``perm`` with ``to_nibbles(convert(codes)) == codes.flatten()[perm]`` for every ``codes [n, k]``.

    The position index of every code is fed through the converter one hex digit at a time, so
    ``ceil(log16(n*k))`` conversions reveal where each code lands. Returns None when the converter is
    not a pure nibble permutation (then the layout cannot be decoded and is not used).
    """
    total = n * k
    idx = torch.arange(total, dtype=torch.int64, device=device)
    perm = torch.zeros(0, dtype=torch.int64, device=device)
    for d in range(max(1, math.ceil(math.log(total, 16)))):
        digit = ((idx >> (4 * d)) & 0xF).reshape(n, k)
        nib = to_nibbles(convert(digit)).to(torch.int64)
        if nib.numel() != total:
            return None
        perm = nib << (4 * d) if d == 0 else perm | (nib << (4 * d))
    if not torch.equal(torch.sort(perm).values, idx):
        return None
    codes = torch.randint(0, 16, (n, k), device=device)
    if not torch.equal(to_nibbles(convert(codes)).to(torch.int64), codes.reshape(-1)[perm]):
        return None
    return perm


@functools.lru_cache(maxsize=64)
def _block_permutation(layout_name: str, k: int, device_str: str) -> torch.Tensor | None:
    layout = INT4_LAYOUTS[layout_name]
    device = torch.device(device_str)
    b = layout.row_block
    perm = nibble_permutation(layout.convert, b, k, device)
    two = nibble_permutation(layout.convert, 2 * b, k, device)
    # Row blocks must be independent: block 1 of a 2-block matrix is block 0 shifted by b*k codes.
    if perm is None or two is None or not torch.equal(two, torch.cat([perm, perm + b * k])):
        return None
    return perm


def block_permutation(layout_name: str, k: int, device: torch.device) -> torch.Tensor | None:
    """Nibble permutation of one ``row_block x k`` block of ``layout_name`` (cached), or None."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _block_permutation(layout_name, k, str(device))


def int4_decode_rows(layout_name: str, qweight: torch.Tensor, k: int, rows: torch.Tensor | None) -> torch.Tensor:
    """Codes ``uint8 [R, k]`` of ``rows`` (all rows when None) from a kernel-layout weight."""
    layout = INT4_LAYOUTS[layout_name]
    b = layout.row_block
    perm = block_permutation(layout_name, k, qweight.device)
    assert perm is not None, "layout was accepted without a decodable permutation"
    blocks = qweight.contiguous().view(torch.uint8).reshape(-1, b * k // 2)
    if rows is not None:
        blocks = blocks[torch.div(rows, b, rounding_mode="floor")]
    nib = torch.stack([blocks & 0xF, blocks >> 4], dim=-1).reshape(blocks.shape[0], b * k)
    codes = torch.empty_like(nib)
    codes[:, perm] = nib
    codes = codes.reshape(-1, b, k)
    if rows is None:
        return codes.reshape(-1, k)
    return codes[torch.arange(rows.numel(), device=rows.device), rows % b]


# ------------------------------------------------------------------------------------------ CUDA probes


@functools.lru_cache(maxsize=16)
def _cuda_probe_cached(name: str, device_str: str) -> bool:
    device = torch.device(device_str)
    try:
        if name == "int8pack":
            x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
            q = torch.randint(-8, 8, (32, 64), device=device, dtype=torch.int8)
            torch._weight_int8pack_mm(x, q, torch.ones(32, device=device, dtype=torch.bfloat16))
        elif name == "int_mm":
            a = torch.randint(-8, 8, (32, 64), device=device, dtype=torch.int8)
            torch._int_mm(a, a.t())  # [32, 64] @ column-major [64, 32], the layout int8_int8_mm uses
        elif name == "int4pack":
            codes = torch.randint(0, 16, (32, 128), device=device)
            w = CudaInt4Layout().convert(codes)
            sz = torch.ones(4, 32, 2, device=device, dtype=torch.bfloat16)
            torch._weight_int4pack_mm(torch.randn(4, 128, device=device, dtype=torch.bfloat16), w, 32, sz)
        torch.cuda.synchronize(device)
        return True
    except (RuntimeError, NotImplementedError):
        # Not compiled for this GPU / this build: the caller falls back to dequantize-then-matmul.
        return False


def _cuda_probe(name: str, device: torch.device) -> bool:
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _cuda_probe_cached(name, str(device))
