"""``CastCache``: a tensor's copy in another dtype, made once and remade only when the tensor changes.

Batch-1 decode is overhead bound, so small parameters (norm weights, int8 row scales) that meet
activations of another dtype are not cast again on every call. The copy is derived state: it is not a
buffer, so it is neither saved nor counted in weight bytes (it is at most a few KiB per module).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tensor_version(t: torch.Tensor) -> int:
    """``t._version`` (bumped by in-place updates), or -1 for inference tensors, which do not track one
    (a model loaded under ``torch.inference_mode()``: its weights cannot change outside that mode)."""
    return -1 if t.is_inference() else t._version


class CastCache:
    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._value: torch.Tensor | None = None

    def get(
        self, t: torch.Tensor, dtype: torch.dtype, derive: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``t`` in ``dtype`` (``t`` itself when it already is and there is no ``derive``), passed through
        ``derive`` when given (one cache holds one derived form)."""
        if t.dtype == dtype and derive is None:
            return t
        if torch.compiler.is_compiling():
            # traced into the graph (and fused) rather than guarded on cache state
            return t.to(dtype) if derive is None else derive(t.to(dtype))
        key = (dtype, t.device, t.data_ptr(), tensor_version(t))
        if key != self._key or self._value is None:
            v = t.detach().to(dtype)
            self._key, self._value = key, v if derive is None else derive(v)
        return self._value

    @property
    def value(self) -> torch.Tensor | None:
        """The copy made last, if any."""
        return self._value
