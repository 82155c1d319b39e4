"""Group-wise weight-only int2/3/4/6/8: :class:`GroupQuantLinear`.

Kernel choices (CPU: EPYC with AVX512-BF16, 2 threads, torch 2.13; CUDA: H200, torch 2.11). The module keeps
int4 weights in the int4 kernel layout when the shape allows it (CPU: ``out % 64 == 0``, CUDA:
``out % 8 == 0``, ``in % 32 == 0``); that layout is exactly as large as the bit-packed codes, so nothing else
is kept. The kernel is used for every batch size: a batch-1 pass over SmolLM2-135M's matrices takes 4.8 ms
(fp16 ``F.linear``: 6.9, bf16: 11.5, fp32: 33; the dequantizing int3/int2 paths: 123/91) and at 64 rows
58 ms (bf16 GEMM: 41). Dequantizing once per call (~1.2 ms for 960x576) only pays off beyond ~500 rows,
which prefill chunks rarely reach. Other widths (2/3/6/8) and shapes the kernels reject (odd ``out``)
unpack the bit-packed codes, dequantize to the compute dtype and call ``F.linear`` (torch has no kernel
for them), or run frugallm's native low-bit kernel for decode rows on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.quant import kernels
from frugallm.quant.groups import GroupQuantState, check_groups, dequant_groups, param_dtype, rtn_group_quantize
from frugallm.quant.layer import as_dtype, bias_of, finish, flatten_input, tensor_bytes
from frugallm.quant.packing import pack, unpack
from frugallm.quant.spec import QuantSpec

# From this many rows, dequantizing an int4 weight to bf16 and running a GEMM beats the packed int4 kernel on
# CPU (crossover measured at ~140 rows for the default model's shapes; kernels.CpuInt4Layout.dequantizer).
INT4_DEQUANT_MIN_ROWS = 192


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
