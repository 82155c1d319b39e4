"""GGUF quantized weights run as stored: :class:`GGUFLinear` keeps each weight row's raw ggml blocks.

Memory is the file's bytes (the blocks may be a zero-copy view of the GGUF memmap). Few-row passes (decode,
speculative verify, short prompts: up to ``kernels.GGUF_FP32_MAX_ROWS`` rows with fp32 activations, fewer with
bf16 ones, :meth:`GGUFLinear.few_rows_limit`) run ``torch.ops.frugallm.gguf_linear`` (``csrc/gguf_linear.cpp``):
blocks decoded in registers against fp32 activations (FMAs) or bf16 ones (``vdpbf16ps`` on AVX512-BF16 CPUs),
equal to dequantize-then-matmul up to fp32 rounding. Larger
passes (prefill) dequantize ``PREFILL_TILE_ROWS`` output rows at a time (``gguf_dequantize``) and run ``F.linear``.

Native types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; F32 / F16 / BF16 rows are also
accepted (run as plain float weights). Other GGUF types (IQ*, TQ*, MXFP4...) are rejected here: the loader
dequantizes those at load.

``act_quant="q8"`` (``LLM(weights="stored-q8")``, opt-in, NOT exact) runs those few-row passes through
``torch.ops.frugallm.gguf_linear_q8`` (``csrc/gguf_q8.cpp``) instead for the types in ``Q8_TYPES``: each input row
is quantized to int8 per 32 values (:func:`q8_quantize`) and meets the weight's integer codes in integer dot
products, llama.cpp's arithmetic (memory-bound where the exact kernel is compute-bound). Prefill passes and other
types keep the exact paths; without that kernel (a CPU below AVX2, ``FRUGALLM_NATIVE=0``) everything runs exact.

Segments of a multiple of 16 rows may be repacked at load into interleaved "x16" layouts (``quant/gguf_x16.py``:
which types, on which CPUs, the ops); their few-row passes then run the x16 kernels, exact the same way.

Without the native kernel (no compiler, ``FRUGALLM_NATIVE=0``, a CPU below AVX2, another device) every pass
dequantizes with ``gguf.quants.dequantize`` (numpy, the format's reference code) and runs ``F.linear``: correct
everywhere, but it re-dequantizes the weight on every call (tens of ms per large matrix), so it is a
correctness fallback, not a fast path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from torch import nn

from frugallm import native
from frugallm.errors import FrugalError
from frugallm.quant import kernels
from frugallm.quant.gguf_x16 import X16_B32_TYPES, X16_LAYOUTS, X16_Q8_TYPES, drop_file_pages, repacks
from frugallm.quant.layer import flatten_input, tensor_bytes

Q = GGMLQuantizationType
# Types csrc/gguf_linear.cpp runs on the stored blocks.
NATIVE_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
# Unquantized rows: viewed as float and multiplied as they are.
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
SUPPORTED_TYPES = NATIVE_TYPES | frozenset(FLOAT_TYPES)
KERNEL = "gguf_linear"  # csrc/gguf_linear.cpp
# Types csrc/gguf_q8.cpp multiplies with int8 activations (act_quant="q8"); the others keep the exact kernel.
Q8_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
Q8_KERNEL = "gguf_q8"  # csrc/gguf_q8.cpp
# Output rows per dequantized tile in a many-row pass (GGUFLinear._dequantized_matmul): 2048 rows of 1536 bf16
# values are 6 MiB, inside a server CPU's L3, and large enough that the GEMM per tile runs at full speed.
PREFILL_TILE_ROWS = 2048
ACT_QUANTS = ("q8",)  # act_quant values GGUFLinear accepts (None: exact fp32 / bf16 activations)
Q8_NOTE = "activations quantized to int8 per 32 values (llama.cpp's arithmetic): not exact"


def q8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, K]`` -> ``(codes int8 [rows, K], scales fp32 [rows, K / 32])``, the kernel's arithmetic op for op.

    Per block of 32 values: ``d = max|x| / 127``, ``inv = 1 / d`` (0 for an all-zero block), ``q = round(x * inv)``
    rounding half to even (torch.round; the kernel's ``cvtps2dq`` in the default rounding mode), clamped to +-127.
    ``codes * scales`` (per block) is the activation the integer dot products see.
    """
    rows, k = x.shape
    if k % 32:
        raise FrugalError(f"int8 activations are quantized in blocks of 32 values; in_features={k} is not a multiple")
    xb = x.float().reshape(rows, k // 32, 32)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(rows, k), d


def q8_dequantize_input(x: torch.Tensor) -> torch.Tensor:
    """``x [rows, K]`` as the int8 kernel sees it: ``codes * scales`` in fp32 (see :func:`q8_quantize`)."""
    q, d = q8_quantize(x)
    return (q.float().reshape(*d.shape, 32) * d[..., None]).reshape(q.shape)


def row_bytes(qtype: int, in_features: int) -> int:
    """Bytes of one weight row of ``in_features`` values stored as ``qtype``."""
    qt = _check_type(qtype)
    block, size = GGML_QUANT_SIZES[qt]
    if in_features <= 0 or in_features % block:
        raise FrugalError(f"{qt.name} stores rows in blocks of {block} values; in_features={in_features} is not a "
                          f"positive multiple of {block}")
    return in_features // block * size


def _check_type(qtype: int) -> GGMLQuantizationType:
    try:
        qt = GGMLQuantizationType(int(qtype))
    except ValueError:
        qt = None
    if qt not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise FrugalError(f"GGUF type {qtype!r} cannot run as stored (supported: {names}); dequantize it at load")
    return qt


def as_uint8(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The bytes of ``data`` as a uint8 tensor, without a copy.

    A read-only numpy array (``GGUFReader``'s memmap opens the file with ``mode="r"``) is wrapped with
    ``torch.from_numpy`` under a silenced "not writable" warning: the tensor shares the file's pages, so
    memory is the file size, and nothing here ever writes it (the kernels only read). Writing into it would
    fault (read-only mapping), which is the behaviour we want.
    """
    if isinstance(data, torch.Tensor):
        return data.contiguous().view(torch.uint8)
    arr = np.ascontiguousarray(data).view(np.uint8)  # a no-op on GGUFReader's contiguous rows
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def unpermute_rows(raw: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row interleave (see ``loading/gguf._unpermute``) on raw rows ``[N, bytes]``.

    Each row is an independent run of blocks, so permuting rows of the bytes is exact. The result is a new
    tensor (``N * bytes`` bytes): the permuted rows cannot be a view of the file.
    """
    n = raw.shape[0]
    if n % (2 * n_head):
        raise FrugalError(f"{n} rows cannot be split into {n_head} heads of rotary pairs")
    return raw.reshape(n_head, n // n_head // 2, 2, -1).transpose(1, 2).reshape(raw.shape).contiguous()


def segment_from_reader(tensor, n_head: int | None = None) -> tuple[int, torch.Tensor, int]:
    """``(qtype, raw [N, bytes], N)`` of a 2-D ``gguf.ReaderTensor`` (``.shape`` is GGUF's ``[K, N]``), with
    llama's Q/K rows un-permuted when ``n_head`` is given."""
    if len(tensor.shape) != 2:
        raise FrugalError(f"{tensor.name}: a linear weight must be 2-D, got GGUF shape {list(tensor.shape)}")
    k, n = (int(s) for s in tensor.shape)
    qtype = int(tensor.tensor_type)
    raw = as_uint8(tensor.data).reshape(n, row_bytes(qtype, k))
    return qtype, unpermute_rows(raw, n_head) if n_head else raw, n


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, start + rows)`` of the output, stored as ``qtype`` in buffer ``raw{index}``: ``layout``
    ``"stored"`` (the file's rows ``[rows, bytes]``) or ``"x16"`` (a type of ``X16_LAYOUTS`` repacked,
    ``[rows / 16, 16 * bytes]``)."""

    qtype: int
    start: int
    rows: int
    layout: str = "stored"


class GGUFLinear(nn.Module):
    """``y = x @ W^T (+ bias)`` with ``W [out, in]`` kept as raw GGUF blocks, in row segments of any types.

    Parameters
    ----------
    segments
        ``[(qtype, raw, rows), ...]`` in output order: ``raw`` holds ``rows`` weight rows of ``qtype`` blocks
        (uint8 tensor or numpy array of ``rows * row_bytes(qtype, in_features)`` bytes; kept without a copy).
        Several segments make one fused linear (qkv_proj from Q4_K q/k and a Q6_K v, as in Q4_K_M files).
    in_features
        Values per weight row (a multiple of the types' block sizes: 32, or 256 for K-quants).
    bias
        Optional ``[out]``, kept in fp32.
    act_quant
        ``None`` (exact) or ``"q8"``: passes of up to ``NATIVE_QUANT_MAX_ROWS`` rows quantize the activations to
        int8 per 32 values (``csrc/gguf_q8.cpp``, segments of ``Q8_TYPES``), as llama.cpp does; not exact.

    ``forward(x [..., in]) -> [..., out]`` in ``x``'s dtype.
    """

    def __init__(self, segments: Sequence[tuple[int, np.ndarray | torch.Tensor, int]], in_features: int,
                 bias: torch.Tensor | None = None, act_quant: str | None = None) -> None:
        super().__init__()
        if not segments:
            raise FrugalError("GGUFLinear needs at least one row segment")
        if act_quant is not None and act_quant not in ACT_QUANTS:
            raise FrugalError(f"unknown act_quant {act_quant!r}; choices: None, {', '.join(ACT_QUANTS)}")
        self.act_quant = act_quant
        # Passes of up to this many rows take the int8 path (prefill above it dequantizes, exact); set_act_quant
        # raises it to score whole windows through the int8 kernel, as llama.cpp's perplexity does.
        self.act_quant_max_rows = kernels.NATIVE_QUANT_MAX_ROWS
        self.in_features = int(in_features)
        self.segments: list[Segment] = []
        start = 0
        for i, (qtype, raw, rows) in enumerate(segments):
            qt = _check_type(qtype)
            t = as_uint8(raw)
            expected = int(rows) * row_bytes(qt, self.in_features)
            if t.numel() != expected:
                raise FrugalError(f"segment {i} ({qt.name}): {t.numel()} bytes, but {rows} rows of "
                                  f"{self.in_features} values take {expected}")
            t, layout = t.reshape(int(rows), -1), "stored"
            if (act_quant is None or qt in X16_Q8_TYPES) and repacks(qt, int(rows), t.device, act_quant):
                t, layout = X16_LAYOUTS[qt][0](t), "x16"
                drop_file_pages(as_uint8(raw))  # the memmap's pages are no longer read: RSS counts them once
            self.register_buffer(f"raw{i}", t)
            self.segments.append(Segment(int(qt), start, int(rows), layout))
            start += int(rows)
        self.out_features = start
        if bias is not None and bias.numel() != self.out_features:
            raise FrugalError(f"bias has {bias.numel()} values for {self.out_features} outputs")
        self.register_buffer("bias", None if bias is None else bias.detach().float().reshape(-1).contiguous())

    @classmethod
    def from_segments(cls, segments: Sequence[tuple[int, np.ndarray | torch.Tensor, int]], in_features: int,
                      bias: torch.Tensor | None = None, act_quant: str | None = None) -> GGUFLinear:
        """``GGUFLinear(segments, in_features, bias, act_quant)``: ``[(qtype, raw, rows), ...]`` fused in output
        order."""
        return cls(segments, in_features, bias, act_quant)

    @classmethod
    def from_reader_tensors(cls, tensors: Sequence, n_heads: Sequence[int | None] | None = None,
                            bias: torch.Tensor | None = None, act_quant: str | None = None) -> GGUFLinear:
        """Fuse ``gguf.ReaderTensor`` weights along the output dim (``n_heads[i]``: un-permute Q/K rows)."""
        heads = n_heads or [None] * len(tensors)
        segs = [segment_from_reader(t, h) for t, h in zip(tensors, heads, strict=True)]
        return cls(segs, int(tensors[0].shape[0]), bias, act_quant)

    def raw(self, i: int) -> torch.Tensor:
        return getattr(self, f"raw{i}")

    def _bias(self, seg: Segment) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[seg.start : seg.start + seg.rows]

    # -- dequantization --------------------------------------------------------------------------------------

    def _dequantize_raw(self, qtype: int, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if qtype in FLOAT_TYPES:
            return raw.view(FLOAT_TYPES[qtype]).to(dtype)
        if raw.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and \
                native.usable(KERNEL):
            return torch.ops.frugallm.gguf_dequantize(raw, qtype, self.in_features, dtype)
        w = gguf_dequantize(raw.cpu().numpy(), GGMLQuantizationType(qtype))  # the reference, fp32 [rows, in]
        return torch.from_numpy(w).to(device=raw.device, dtype=dtype)

    def stored(self, i: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Segment ``i``'s rows (all, or those at ``rows [R]``) in the file's layout ``[R, bytes]`` (an x16
        segment is unpacked bit for bit)."""
        raw, s = self.raw(i), self.segments[i]
        if s.layout == "x16":
            idx = None if rows is None else rows.to(device="cpu", dtype=torch.long)
            return X16_LAYOUTS[s.qtype][1](raw.cpu(), s.rows, idx).to(raw.device)
        return raw if rows is None else raw[rows]

    def use_stored_layout(self) -> None:
        """Put x16 segments back in the file's layout where the int8-activation kernel reads that (the types
        without an x16 int8 kernel: not ``X16_Q8_TYPES``)."""
        for i, s in enumerate(self.segments):
            if s.layout == "x16" and s.qtype not in X16_Q8_TYPES:
                setattr(self, f"raw{i}", self.stored(i))
                self.segments[i] = Segment(s.qtype, s.start, s.rows)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Full weight ``[out, in]`` in ``dtype``."""
        parts = [self._dequantize_raw(s.qtype, self.stored(i), dtype) for i, s in enumerate(self.segments)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``[R] -> [R, in]`` fp32 (embedding lookups on the stored blocks)."""
        rows = rows.reshape(-1)
        out = torch.empty(rows.numel(), self.in_features, dtype=torch.float32, device=rows.device)
        for i, s in enumerate(self.segments):
            hit = (rows >= s.start) & (rows < s.start + s.rows)
            if bool(hit.any()):
                out[hit] = self._dequantize_raw(s.qtype, self.stored(i, rows[hit] - s.start), torch.float32)
        return out

    # -- matmul ----------------------------------------------------------------------------------------------

    def _native_ok(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and native.usable(KERNEL)

    def few_rows_limit(self, dtype: torch.dtype, exact: bool = False) -> int:
        """The largest pass the native kernels take for ``dtype`` activations (above it: dequantize-then-GEMM;
        see ``kernels.GGUF_FP32_MAX_ROWS``); ``exact``: the exact kernels' limit, whatever ``act_quant``."""
        if self.act_quant is not None and not exact:
            return kernels.NATIVE_QUANT_MAX_ROWS
        if dtype == torch.float32:
            return kernels.GGUF_FP32_MAX_ROWS
        if all(s.layout == "x16" or s.qtype in FLOAT_TYPES for s in self.segments):
            return kernels.GGUF_X16_BF16_MAX_ROWS
        return kernels.NATIVE_QUANT_MAX_ROWS

    def _op(self, seg: Segment, exact: bool = False) -> Callable[..., torch.Tensor]:
        """The few-rows native op for ``seg``: int8 activations where asked and available (not ``exact``), the
        x16 kernel on a repacked segment."""
        q8 = self.act_quant == "q8" and not exact
        if seg.layout == "x16" and q8 and seg.qtype in X16_Q8_TYPES:
            return torch.ops.frugallm.gguf_x16_linear_q8
        if seg.layout == "x16":
            return (torch.ops.frugallm.gguf_x16_b32_linear if seg.qtype in X16_B32_TYPES
                    else torch.ops.frugallm.gguf_x16_linear)
        if q8 and seg.qtype in Q8_TYPES and native.usable(Q8_KERNEL):
            return torch.ops.frugallm.gguf_linear_q8
        return torch.ops.frugallm.gguf_linear

    def _segment_fns(self, exact: bool = False) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Per segment, ``x [M, in]`` (contiguous fp32 / bf16, M small) -> ``[M, rows]`` in x's dtype
        (``exact``: the exact ops, whatever ``act_quant``)."""
        fns = []
        for i, s in enumerate(self.segments):
            raw, bias = self.raw(i), self._bias(s)
            if s.qtype in FLOAT_TYPES:
                w = raw.view(FLOAT_TYPES[s.qtype])
                fns.append(lambda x, w=w, b=bias: F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype)))
            else:
                op, args = self._op(s, exact), (raw, s.qtype, s.rows, bias)
                fns.append(lambda x, op=op, args=args: op(x, *args))
        return fns

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """``self(x)`` for 2-D contiguous ``x`` in ``dtype`` (see ``DecodePlan``): the native op per segment
        directly for up to ``few_rows_limit(dtype)`` rows, without ``forward``'s per-call checks."""
        if not self._native_ok(device, dtype):
            return self.forward
        fns = self._segment_fns()
        limit = self.few_rows_limit(dtype)
        if len(fns) == 1 and self.segments[0].qtype not in FLOAT_TYPES:
            s = self.segments[0]
            return kernels.few_rows_kernel(self._op(s), (self.raw(0), s.qtype, s.rows, self._bias(s)),
                                           self.forward, limit)
        return lambda x: torch.cat([f(x) for f in fns], 1) if x.shape[0] <= limit else self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = flatten_input(x, self.in_features)
        rows = x2.shape[0]
        quant = self.act_quant is not None and rows <= max(self.act_quant_max_rows, self.few_rows_limit(x.dtype))
        # Above the int8 passes a module with act_quant runs what the same module without it runs (bit for bit).
        few = quant or rows <= self.few_rows_limit(x.dtype, exact=True)
        if few and self._native_ok(x.device, x.dtype):
            ys = [f(x2.contiguous()) for f in self._segment_fns(exact=not quant)]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, 1)
        else:
            # fp16 GEMMs are very slow on CPU: dequantize to bf16 there.
            cd = torch.bfloat16 if (x.device.type == "cpu" and x.dtype == torch.float16) else x.dtype
            y = self._dequantized_matmul(x2.to(cd), cd).to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _dequantized_matmul(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x [M, in] @ W.T + bias`` in ``dtype`` for many rows (prefill, scoring), dequantizing W a tile of
        ``PREFILL_TILE_ROWS`` output rows at a time: no full-size dequantized weight (a 151,936-row head is 467 MB
        in bf16) and no concatenation of fused parts, so prefill's resident memory stays near the weights and the
        KV cache, and each tile is still in cache when its GEMM reads it. Same products and sums as one GEMM over
        the whole weight (a tile boundary splits outputs, not reductions)."""
        y = torch.empty(x.shape[0], self.out_features, dtype=dtype, device=x.device)
        for i, s in enumerate(self.segments):
            for r0 in range(0, s.rows, PREFILL_TILE_ROWS):
                n = min(PREFILL_TILE_ROWS, s.rows - r0)
                raw = self.stored(i, torch.arange(r0, r0 + n)) if s.layout == "x16" else self.raw(i)[r0 : r0 + n]
                a, b = s.start + r0, s.start + r0 + n
                bias = None if self.bias is None else self.bias[a:b].to(dtype)
                y[:, a:b] = F.linear(x, self._dequantize_raw(s.qtype, raw, dtype), bias)
        return y

    def weight_bytes(self) -> int:
        return tensor_bytes(*(self.raw(i) for i in range(len(self.segments))), self.bias)

    def extra_repr(self) -> str:
        types = "+".join(f"{GGMLQuantizationType(s.qtype).name}x{s.rows}{'(x16)' if s.layout == 'x16' else ''}"
                         for s in self.segments)
        act = "" if self.act_quant is None else f", act_quant={self.act_quant}"
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf={types}{act}"


def set_act_quant(model: nn.Module, act_quant: str | None, max_rows: int | None = None) -> int:
    """Set ``act_quant`` on every :class:`GGUFLinear` in ``model``; returns how many were set. Call it before
    the first decode step (a built ``DecodePlan`` keeps the ops it chose). ``max_rows``: the largest pass that
    takes the int8 path (default ``NATIVE_QUANT_MAX_ROWS``: decode only; a large value runs prefill and scoring
    through it too, as llama.cpp does, e.g. to measure the perplexity int8 activations give)."""
    if act_quant is not None and act_quant not in ACT_QUANTS:
        raise FrugalError(f"unknown act_quant {act_quant!r}; choices: None, {', '.join(ACT_QUANTS)}")
    if max_rows is not None and max_rows < 1:
        raise FrugalError(f"max_rows must be >= 1, got {max_rows}")
    mods = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    for m in mods:
        if act_quant is not None:
            m.use_stored_layout()
        m.act_quant = act_quant
        m.act_quant_max_rows = kernels.NATIVE_QUANT_MAX_ROWS if max_rows is None else max_rows
    return len(mods)
