"""Quantized replacements for ``nn.Linear``: ``forward(x [..., in]) -> [..., out]`` plus bias.

Every module reports ``weight_bytes()``, the bytes it actually stores (codes, scales, offsets,
permutations, bias), and is built by ``from_linear(linear, spec)`` (round-to-nearest) or directly from
a quantizer's state (``GroupQuantLinear(state)``; GPTQ and the other methods in ``methods.py``).

Kernel choices (CPU: EPYC with AVX512-BF16, 2 threads, torch 2.13; CUDA: H200, torch 2.11; us per matmul).
On CPU every path computes in bf16 (see ``kernels.py``) and casts the result back to the input dtype.

* :class:`Int8Linear` uses frugallm's native int8 kernel (``csrc/int8_linear.cpp``, AVX-512 CPUs) for up to
  16 rows: over SmolLM2-135M's matrices 2.6 ms at 1 row vs 4.2 for ``torch._weight_int8pack_mm`` (12.5 vs 13.1
  at 16). Elsewhere, ``torch._weight_int8pack_mm`` for up to :data:`INT8_KERNEL_MAX_ROWS` token rows and
  dequantize-then-matmul above: on CPU for 1536x576 the kernel takes 14 us at 1 row (bf16 ``F.linear``: 42,
  fp32: 51) but 740 us at 128 rows, where dequantizing to bf16 and calling ``F.linear`` takes 370. On CUDA
  neither beats fp16 ``F.linear`` (no fused int8 GEMV in torch); the kernel is used for single rows only.
* :class:`GroupQuantLinear` keeps int4 weights in the int4 kernel layout when the shape allows it (CPU:
  ``out % 64 == 0``, CUDA: ``out % 8 == 0``, ``in % 32 == 0``); that layout is exactly as large as the
  bit-packed codes, so nothing else is kept. The kernel is used for every batch size: a batch-1 pass over
  SmolLM2-135M's matrices takes 4.8 ms (fp16 ``F.linear``: 6.9, bf16: 11.5, fp32: 33; the dequantizing
  int3/int2 paths: 123/91) and at 64 rows 58 ms (bf16 GEMM: 41). Dequantizing once per call (~1.2 ms
  for 960x576) only pays off beyond ~500 rows, which prefill chunks rarely reach. Other widths
  (2/3/6/8) and shapes the kernels reject (odd ``out``) unpack the bit-packed codes, dequantize to the
  compute dtype and call ``F.linear`` (torch has no kernel for them).
* :class:`LLMInt8Linear` uses ``torch._int_mm`` (exact int32 accumulation) - see its docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.errors import FrugalError
from frugallm.model.casts import CastCache
from frugallm.quant import kernels
from frugallm.quant.packing import pack, unpack
from frugallm.quant.spec import QuantSpec

# From this many rows, dequantizing an int4 weight to bf16 and running a GEMM beats the packed int4 kernel on
# CPU (crossover measured at ~140 rows for the default model's shapes; kernels.CpuInt4Layout.dequantizer).
INT4_DEQUANT_MIN_ROWS = 192
# Above this many token rows dequantize + GEMM beats torch._weight_int8pack_mm. CPU: crossover between 32
# and 64 rows for the SmolLM2 shapes. CUDA (H200, torch 2.11): the kernel is only competitive for a
# single row (960x576: 58 vs 71 us) and collapses with rows (3072x576 at 64 rows: 168 vs 71 us).
INT8_KERNEL_MAX_ROWS = {"cpu": 32, "cuda": 1}


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def param_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """16-bit storage dtype for scales/offsets: fp16 (more precise) unless values leave its normal range."""
    for t in tensors:
        a = t.abs()
        nz = a[a > 0]
        if a.max() > 6.0e4 or (nz.numel() and nz.min() < 2.0**-14):
            return torch.bfloat16
    return torch.float16


def flatten_input(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise FrugalError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    return x if x.dim() == 2 else x.reshape(-1, in_features)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Checked in Python: a no-op ``.to`` still costs a dispatch, and batch-1 decode is overhead bound.
    return t if t.dtype == dtype else t.to(dtype)


def finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``y [M, N]`` -> the input's dtype and leading shape, plus ``bias``."""
    y = as_dtype(y, x.dtype)
    if bias is not None:
        y = y + as_dtype(bias, x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)


# ------------------------------------------------------------------------------------------------ int8


@dataclass
class Int8State:
    """Per-output-channel symmetric int8: ``w[n, k] = qweight[n, k] * scales[n]``."""

    qweight: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N] fp32
    bias: torch.Tensor | None


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``w [N, K]`` -> ``(int8 [N, K], fp32 scales [N])``."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """Weight-only int8 (per output channel, symmetric); see the module docstring for the kernel choice."""

    def __init__(self, state: Int8State) -> None:
        super().__init__()
        self.out_features, self.in_features = state.qweight.shape
        self.register_buffer("qweight", state.qweight.contiguous())
        self.register_buffer("scales", state.scales.float())
        self.register_buffer("bias", state.bias)
        self._init_runtime()

    def _init_runtime(self) -> None:
        """Derived, never-saved state; the storage loader calls this too (it bypasses ``__init__``)."""
        self._scales_cast = CastCache()  # the scales in the kernel's activation dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec | None = None) -> Int8Linear:
        q, s = quantize_int8_rows(linear.weight.detach())
        return cls(Int8State(q, s, bias_of(linear)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Full weight ``[N, K]`` in ``dtype``."""
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``[R] -> [R, K]`` fp32 (embedding lookup on shared storage)."""
        return self.qweight[rows].float() * self.scales[rows, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = flatten_input(x, self.in_features)
        cd = kernels.compute_dtype(x.device, x.dtype)
        xc = as_dtype(x2, cd)
        max_rows = INT8_KERNEL_MAX_ROWS.get(x.device.type, 0)
        if x2.shape[0] <= kernels.NATIVE_QUANT_MAX_ROWS and kernels.native_kernel("int8_linear", x.device, cd):
            y = torch.ops.frugallm.int8_linear(xc.contiguous(), self.qweight, self.scales, None)
        elif x2.shape[0] <= max_rows and kernels.int8pack_supported(x.device, self.in_features):
            y = kernels.int8_weight_mm(xc, self.qweight, self._scales_cast.get(self.scales, cd))
        else:
            y = F.linear(xc, self.dequantize(cd))
        return finish(y, x, self.bias, self.out_features)

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """``self(x)`` for 2-D ``x`` in ``dtype`` (see ``DecodePlan``): the native kernel directly where it
        serves, without ``forward``'s per-call checks (~10 us per call at batch 1)."""
        if self.bias is not None or not kernels.native_kernel("int8_linear", device, dtype):
            return self.forward
        return kernels.few_rows_kernel(torch.ops.frugallm.int8_linear, (self.qweight, self.scales, None), self.forward)

    def weight_bytes(self) -> int:
        return tensor_bytes(self.qweight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


class LLMInt8Linear(Int8Linear):
    """LLM.int8() (Dettmers et al. 2022): vector-wise int8 x int8 matmul plus an outlier decomposition.

    ``y = s_x s_w^T * (Xq_regular @ Wq^T)  +  X[:, O] @ (Wq[:, O] * s_w)^T`` where ``O`` are the input
    features whose activation magnitude exceeds ``threshold`` in this forward call (in any token row, as
    bitsandbytes). Regular columns are quantized per token row and multiplied exactly in int32
    (``torch._int_mm``); the outlier columns keep the activations in full precision.

    Row quantization: absmax (``Xq = round(127 X / absmax)``; the bitsandbytes kernel, the default) or,
    with ``zeropoint=True``, the paper's zeropoint variant (its Table 1: the most accurate one): each row
    is centred on ``c = (max + min) / 2`` of its regular values before rounding, so a skewed row uses all
    255 levels; ``c`` comes back through the int32 row sums of ``Wq`` over the regular columns.

    bf16 decode rows (absmax, no bias, up to ``NATIVE_QUANT_MAX_ROWS``) run the same arithmetic in one native op
    (``csrc/llm_int8_linear.cpp``: VNNI int8 products; within one bf16 step of this path).

    Memory choice (as in bitsandbytes): only the int8 weights are stored, for all columns; the outlier
    columns of W are dequantized on the fly. Keeping those columns in fp16, as in the paper, would need
    the full-precision weight since the outlier set is only known per input.

    The threshold is absolute, and 6.0 suits models whose normalized activations are O(1) (OPT, where the
    paper set it). SmolLM2-135M's are ~0.2-0.3 RMS and its systematic outlier features (e.g. channel 507
    of every ``qkv_proj`` input, largest on the first, attention-sink token) reach only 2-5: at 6.0 they
    stay in the int8 part (1.2% of input columns decomposed, nearly all late ``down_proj`` inputs), set
    the row scales, and the 8-bit rounding costs +1.8% perplexity (int8 weights alone: +0.4%); threshold
    2.0 decomposes 11% of the columns and costs +0.2% (2048 corpus tokens).
    """

    def __init__(self, state: Int8State, threshold: float = 6.0, zeropoint: bool = False) -> None:
        super().__init__(state)  # same stored weights as Int8Linear; only the forward differs
        self.threshold = float(threshold)
        self.zeropoint = bool(zeropoint)

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._rowsum: tuple[int, torch.Tensor] | None = None  # (qweight.data_ptr(), int32 [N])

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, spec: QuantSpec | None = None, zeropoint: bool = False
    ) -> LLMInt8Linear:
        q, s = quantize_int8_rows(linear.weight.detach())
        threshold = 6.0 if spec is None else spec.threshold
        return cls(Int8State(q, s, bias_of(linear)), threshold, zeropoint or (spec is not None and spec.zeropoint))

    def _weight_rowsum(self) -> torch.Tensor:
        """``sum_k Wq[n, k]`` as int32 ``[N]``: derived from ``qweight``, cached, never stored."""
        if self._rowsum is None or self._rowsum[0] != self.qweight.data_ptr():
            self._rowsum = (self.qweight.data_ptr(), self.qweight.sum(dim=1, dtype=torch.int32))
        return self._rowsum[1]

    def _quantize_rows(
        self, regular: torch.Tensor, outlier: torch.Tensor, any_outlier: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``regular [M, K]`` (outlier columns zeroed) -> ``(int8 [M, K], scale [M], centre [M] or None)``."""
        if not self.zeropoint:
            sx = regular.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            return torch.round(regular / sx[:, None]).clamp(-127, 127).to(torch.int8), sx, None
        # The range of the regular columns only: the zeroed outlier columns must not widen it.
        lo = (regular.masked_fill(outlier, float("inf")) if any_outlier else regular).amin(dim=1)
        hi = (regular.masked_fill(outlier, float("-inf")) if any_outlier else regular).amax(dim=1)
        lo, hi = lo.nan_to_num(posinf=0.0), hi.nan_to_num(neginf=0.0)  # when every column is an outlier
        centre = (hi + lo) / 2
        sx = ((hi - lo) / 254.0).clamp(min=1e-12)
        xq = torch.round((regular - centre[:, None]) / sx[:, None]).clamp(-127, 127)
        if any_outlier:
            xq = xq.masked_fill(outlier, 0.0)
        return xq.to(torch.int8), sx, centre

    def _native_ok(self, x_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether ``csrc/llm_int8_linear.cpp`` serves this call: absmax rows, no bias, bf16 CPU decode rows."""
        return (
            not self.zeropoint
            and self.bias is None
            and x_rows <= kernels.NATIVE_QUANT_MAX_ROWS
            and kernels.native_kernel("llm_int8_linear", device, dtype)
        )

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """``self(x)`` for 2-D ``x`` in ``dtype``: the native kernel directly where it serves (see ``forward``)."""
        if not self._native_ok(1, dtype, device):
            return self.forward
        args = (self.qweight, self.scales, self._weight_rowsum(), self.threshold)
        return kernels.few_rows_kernel(torch.ops.frugallm.llm_int8_linear, args, self.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = flatten_input(x, self.in_features)
        if x is x2 and x.is_contiguous() and self._native_ok(x.shape[0], x.dtype, x.device):
            # The same arithmetic as below, in one pass (int8 products on VNNI); bf16 decode rows only, so
            # fp32 inputs keep full-precision outlier columns.
            return torch.ops.frugallm.llm_int8_linear(x, self.qweight, self.scales, self._weight_rowsum(),
                                                      self.threshold)
        x2 = x2.float()
        outlier = (x2.abs() > self.threshold).any(dim=0)  # [K]
        cols = outlier.nonzero().squeeze(1)
        regular = x2.masked_fill(outlier, 0.0) if cols.numel() else x2
        xq, sx, centre = self._quantize_rows(regular, outlier, bool(cols.numel()))
        acc = kernels.int8_int8_mm(xq, self.qweight)  # [M, N] int32, exact
        y = acc.float() * sx[:, None] * self.scales[None, :]
        if centre is not None:  # zeropoint: + centre * sum over the regular columns of the weight row
            rowsum = self._weight_rowsum()
            if cols.numel():
                rowsum = rowsum - self.qweight[:, cols].sum(dim=1, dtype=torch.int32)
            y = y + centre[:, None] * (rowsum.float() * self.scales)[None, :]
        if cols.numel():
            w_out = self.qweight[:, cols].float() * self.scales[:, None]  # [N, |O|]
            y = y + x2[:, cols] @ w_out.t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        zp = ", zeropoint=True" if self.zeropoint else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}{zp}"


# ------------------------------------------------------------------------------------------- group-wise


@dataclass
class GroupQuantState:
    """Group-wise codes: ``w[n, j] = codes[n, j] * scales[n, j // g] + offsets[n, j // g]``.

    Symmetric quantization stores no offsets; its offset is ``-2**(bits-1) * scale``. Column ``j`` of
    ``codes`` is input feature ``perm[j]`` (GPTQ act-order), or feature ``j`` when ``perm`` is None.
    """

    codes: torch.Tensor  # [N, K] uint8 in [0, 2**bits)
    scales: torch.Tensor  # [N, K/g]
    offsets: torch.Tensor | None  # [N, K/g]
    bits: int
    group_size: int
    bias: torch.Tensor | None = None
    perm: torch.Tensor | None = None  # [K] int64

    def dequantize(self) -> torch.Tensor:
        """``[N, K]`` fp32, in code column order."""
        return dequant_groups(self.codes, self.scales, self.offsets, self.bits, self.group_size)


def check_groups(in_features: int, group_size: int) -> None:
    if in_features % group_size:
        raise FrugalError(
            f"group size {group_size} does not divide in_features {in_features}; "
            f"choose a group size that divides {in_features}"
        )


def group_params(
    w: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales/offsets ``[N, G]`` for groups ``w [N, G, g]``, rounded to their 16-bit storage dtype.

    Asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``offset = min``. Symmetric:
    ``scale = absmax / (2**(bits-1) - 1)``, codes centred on ``2**(bits-1)``.
    """
    if symmetric:
        scales = w.abs().amax(-1) / (2 ** (bits - 1) - 1)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        dtype = dtype or param_dtype(scales)
        return scales.to(dtype).float(), None
    lo, hi = w.amin(-1), w.amax(-1)
    scales = (hi - lo) / (2**bits - 1)
    # A constant group gets scale 1 and code 0, so it reconstructs exactly through the offset.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    dtype = dtype or param_dtype(scales, lo)
    return scales.to(dtype).float(), lo.to(dtype).float()


def group_codes(
    w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Nearest codes for ``w [N, G, g]`` given ``scales/offsets [N, G]`` -> uint8 ``[N, G, g]``."""
    if offsets is None:
        offsets = -(2 ** (bits - 1)) * scales
    q = torch.round((w - offsets[..., None]) / scales[..., None])
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def dequant_groups(
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``codes [N, K]`` + ``scales/offsets [N, K/g]`` -> weight ``[N, K]`` in ``dtype``.

    Computed in fp32 and rounded once: fp16 scales cast to bf16 first would carry a 2^-8 error shared by every
    weight of their group (measured: mix4 perplexity +0.3 %).
    """
    n, k = codes.shape
    s = scales.float()[..., None]
    m = (-(2 ** (bits - 1)) * s) if offsets is None else offsets.float()[..., None]
    w = codes.reshape(n, k // group_size, group_size).float() * s + m
    return w.reshape(n, k).to(dtype)


def rtn_group_quantize(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False
) -> GroupQuantState:
    """Round-to-nearest group-wise quantization of ``weight [N, K]`` (groups along K)."""
    n, k = weight.shape
    check_groups(k, group_size)
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    scales, offsets = group_params(w, bits, symmetric)
    codes = group_codes(w, scales, offsets, bits).reshape(n, k)
    return GroupQuantState(codes, scales, offsets, bits, group_size)


class GroupQuantLinear(nn.Module):
    """Group-wise weight-only int2/3/4/6/8 linear (asymmetric by default; groups along in_features).

    Storage (``layout``):

    * ``"packed"``: ``qweight`` = bit-packed codes ``uint8 [N, K*bits/8]``; ``qscale`` = ``[N, K/g, 2]``
      (scale, offset), or ``[N, K/g, 1]`` when symmetric. Up to ``NATIVE_QUANT_MAX_ROWS`` rows on CPU run
      frugallm's native kernel on these bytes (``csrc/lowbit_linear.cpp``); otherwise dequantize-then-matmul.
    * ``"int4_cpu"`` / ``"int4_cuda"``: 4-bit weights in the torch int4 kernel layout (same byte count as
      the packed codes) and ``qscale`` = ``[K/g, N, 2]`` bf16 in the kernel's ``(q - 8) * scale + zero`` form.

    The layout is chosen at construction for the device of the weights and re-chosen on the first
    forward after a move to another device type.
    """

    def __init__(self, state: GroupQuantState, device: torch.device | None = None) -> None:
        super().__init__()
        codes = state.codes
        self.out_features, self.in_features = codes.shape
        self.bits, self.group_size = state.bits, state.group_size
        self.symmetric = state.offsets is None
        check_groups(self.in_features, self.group_size)
        self.register_buffer("bias", state.bias)
        perm = state.perm
        if perm is not None:
            # int16 indices halve the overhead; positions beyond 32767 need int32.
            perm = perm.to(torch.int16 if self.in_features <= 2**15 else torch.int32)
        self.register_buffer("perm", perm)
        self.layout = "packed"
        self.register_buffer("qweight", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("qscale", torch.empty(0))
        self._store(codes, state.scales, state.offsets, device or codes.device)

    def _init_runtime(self) -> None:
        """Derived, never-saved state; the storage loader calls this too (it bypasses ``__init__``).

        ``_kernel`` holds what the decode fast path needs as plain attributes, because reading buffers
        through ``nn.Module.__getattr__`` costs ~0.4 us each, a fifth of a batch-1 int4 matmul here. It is
        rebuilt whenever the buffers change (``_store``, ``_apply`` on moves and casts).
        """
        layout = kernels.INT4_LAYOUTS.get(self.layout)
        fast = (
            layout is not None
            and self.perm is None
            and self.bias is None
            and self.qscale.dtype == torch.bfloat16
            and self.qweight.device.type == layout.device_type
        )
        self._kernel = (
            (layout.device_type, layout.op, self.qweight, self.qscale, self.group_size, self.in_features,
             self.out_features)
            if fast and layout is not None
            else None
        )
        # Passes of at least INT4_DEQUANT_MIN_ROWS rows dequantize to bf16 and run a GEMM instead.
        self._dequantizer = None if self._kernel is None or layout is None else layout.dequantizer(self.in_features)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, recurse)
        self._init_runtime()
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> GroupQuantLinear:
        """Round-to-nearest at ``spec.bits`` / ``spec.group_size`` (64 when the spec has none)."""
        state = rtn_group_quantize(linear.weight, spec.bits, spec.group_size or 64, spec.symmetric)
        state.bias = bias_of(linear)
        return cls(state)

    # ---- storage

    def _store(
        self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, device: torch.device
    ) -> None:
        codes, scales = codes.to(device), scales.to(device)
        layout = None
        if self.bits == 4:
            layout = kernels.int4_layout_for(device, self.out_features, self.in_features, self.group_size)
        if layout is None:
            self.layout = "packed"
            self.qweight = pack(codes, self.bits)
            if offsets is None:
                self.qscale = scales[..., None].to(param_dtype(scales))
            else:
                offsets = offsets.to(device)
                self.qscale = torch.stack([scales, offsets], -1).to(param_dtype(scales, offsets))
            self._init_runtime()
            return
        offsets = (-8.0 * scales) if offsets is None else offsets.to(device).float()
        zeros = offsets + 8.0 * scales  # (q - 8) * s + zero == q * s + offset
        self.layout = layout.name
        self.qweight = layout.convert(codes)
        self.qscale = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self._init_runtime()

    def _codes_and_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decode the current storage -> ``(codes [N, K], scales [N, G], offsets [N, G] | None)``."""
        if self.layout == "packed":
            codes = unpack(self.qweight, self.bits, self.in_features)
            scales = self.qscale[..., 0].float()
            offsets = None if self.symmetric else self.qscale[..., 1].float()
            return codes, scales, offsets
        codes = kernels.int4_decode_rows(self.layout, self.qweight, self.in_features, None)
        sz = self.qscale.float().transpose(0, 1)
        scales = sz[..., 0]
        offsets = None if self.symmetric else sz[..., 1] - 8.0 * scales
        return codes, scales, offsets

    def _prepare(self, device: torch.device) -> None:
        """Re-layout once if the module was moved to a device its current layout does not run on."""
        if self.layout != "packed":
            if kernels.INT4_LAYOUTS[self.layout].device_type != device.type:
                codes, scales, offsets = self._to_cpu_canonical()
                self._store(codes, scales, offsets, device)
            elif self.qscale.dtype != torch.bfloat16:  # model.half() / .float() cast the buffer
                self.qscale = self.qscale.to(torch.bfloat16)

    def _to_cpu_canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # Decoding needs the permutation of the layout's own device; we are on the wrong device now.
        home = torch.device(kernels.INT4_LAYOUTS[self.layout].device_type)
        saved = self.qweight, self.qscale
        self.qweight, self.qscale = self.qweight.to(home), self.qscale.to(home)
        try:
            return self._codes_and_params()
        finally:
            self.qweight, self.qscale = saved

    # ---- public

    def dequantize(self, dtype: torch.dtype = torch.float32, original_order: bool = True) -> torch.Tensor:
        """Weight ``[N, K]`` in ``dtype``; with ``original_order`` the act-order permutation is undone."""
        if dtype == torch.bfloat16 and self._native_ok(self.qweight.device, dtype):
            # Prefill's dequantize-then-GEMM: one native pass (5-7x the torch unpack), one rounding per weight.
            w = torch.ops.frugallm.lowbit_dequantize(self.qweight, self.qscale, self.bits, self.group_size,
                                                     self.in_features)
        else:
            codes, scales, offsets = self._codes_and_params()
            w = dequant_groups(codes, scales, offsets, self.bits, self.group_size, dtype)
        if original_order and self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm.long()] = w
            w = out
        return w

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``[R] -> [R, K]`` fp32 without decoding the whole matrix (embedding lookups)."""
        assert self.perm is None, "row lookup is only used for embeddings, which have no act-order"
        g = self.in_features // self.group_size
        if self.layout == "packed":
            codes = unpack(self.qweight[rows], self.bits, self.in_features)
            s = self.qscale[rows].float()
            offsets = None if self.symmetric else s[..., 1]
            return dequant_groups(codes, s[..., 0], offsets, self.bits, self.group_size)
        codes = kernels.int4_decode_rows(self.layout, self.qweight, self.in_features, rows)
        sz = self.qscale[:, rows].float().transpose(0, 1)  # [R, G, 2]
        w = (codes.reshape(-1, g, self.group_size).float() - 8.0) * sz[..., :1] + sz[..., 1:]
        return w.reshape(-1, self.in_features)

    def _native_ok(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether ``csrc/lowbit_linear.cpp`` runs this (packed) layout for ``dtype`` inputs on ``device``."""
        return (
            self.layout == "packed"
            and self.group_size % 16 == 0
            and self.qscale.dtype in (torch.float16, torch.bfloat16)
            and self.qweight.device.type == device.type
            and kernels.native_kernel("lowbit_linear", device, dtype)
        )

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` bf16 (act-order columns already permuted), M <= NATIVE_QUANT_MAX_ROWS -> ``[M, N]`` bf16."""
        return torch.ops.frugallm.lowbit_linear(x, self.qweight, self.qscale, self.bits, self.group_size, None)

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """``self(x)`` for 2-D ``x`` in ``dtype`` on ``device``: the raw int4 op where the fast path applies,
        the native low-bit kernel for the packed layout."""
        kernel = self._kernel
        if kernel is not None and dtype == torch.bfloat16 and device.type == kernel[0]:
            _, op, qweight, qscale, group_size, _, _ = kernel
            return lambda x: op(x, qweight, group_size, qscale)
        if self.perm is None and self.bias is None and self._native_ok(device, dtype):
            args = (self.qweight, self.qscale, self.bits, self.group_size, None)
            return kernels.few_rows_kernel(torch.ops.frugallm.lowbit_linear, args, self.forward)
        return self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel
        if kernel is not None and x.dtype == torch.bfloat16 and x.device.type == kernel[0] and x.is_contiguous():
            # Fast path (decode is overhead bound): the int4 op straight on a view of the input.
            _, op, qweight, qscale, group_size, k, n = kernel
            if x.numel() >= INT4_DEQUANT_MIN_ROWS * k and self._dequantizer is not None:
                return F.linear(x, self._dequantizer(qweight, qscale, group_size))
            if x.dim() == 2:  # decode's 2-D residual stream: no view (each op costs ~1 us here)
                return op(x, qweight, group_size, qscale)
            if x.shape[-1] == k:
                return op(x.view(-1, k), qweight, group_size, qscale).view(*x.shape[:-1], n)
        self._prepare(x.device)
        x2 = flatten_input(x, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm.long())
        if self.layout == "packed":
            cd = kernels.compute_dtype(x.device, x.dtype)
            if x2.shape[0] <= kernels.NATIVE_QUANT_MAX_ROWS and self._native_ok(x.device, cd):
                y = self._native(as_dtype(x2, cd).contiguous())
            else:
                y = F.linear(x2.to(cd), self.dequantize(cd, original_order=False))
        else:
            layout = kernels.INT4_LAYOUTS[self.layout]
            y = layout.mm(as_dtype(x2, torch.bfloat16).contiguous(), self.qweight, self.group_size, self.qscale)
        return finish(y, x, self.bias, self.out_features)

    def weight_bytes(self) -> int:
        return tensor_bytes(self.qweight, self.qscale, self.perm, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, layout={self.layout}, "
            f"act_order={self.perm is not None}"
        )


def bias_of(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()
