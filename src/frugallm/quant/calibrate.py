"""The GPTQ model driver: runs calibration through the model and quantizes its linears from their Hessians.

:func:`gptq_quantize_model` quantizes layers *sequentially one transformer block at a time*. The blocks are the
children of the model's largest ``nn.ModuleList`` of modules containing linears (``model.layers``); block
``i``'s Hessians are taken on the outputs of the already-quantized blocks ``< i`` (the error compensation the
paper relies on). Linears of one block share one pass (no "true-sequential" split inside the block), and
linears outside the blocks (``lm_head`` with the ``head`` flag) come last, on a whole calibration pass. With
no block list all linears are calibrated in a single pass on the unquantized model. Each linear's weight is
then solved by :func:`frugallm.quant.gptq.gptq_quantize_weight` (through ``GPTQMethod``).

Cost. When ``run_calib`` can stop a batch early (:class:`StopCalibration`; ``LLM``'s does), the batches'
inputs to block 0 are captured once and then *replayed* block by block, as the reference implementation
does: block ``i`` runs twice per batch (for its Hessians, then quantized to make block ``i + 1``'s
inputs), 2L block passes in all instead of the L(L+1)/2 of re-running the model from the embeddings for
every block. Replay needs blocks called as ``block(x, *rest)`` returning the next ``x`` and KV caches
that can be emptied (``truncate``); otherwise each block's pass runs the model up to that block. Without
early stops every block costs a whole calibration pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frugallm.errors import FrugalError
from frugallm.model.kv_cache import KVCache
from frugallm.quant.methods import GPTQMethod
from frugallm.quant.spec import QuantSpec, as_spec
from frugallm.quant.targets import Target, quantize_embeddings, target_linears


def _block_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's largest ``nn.ModuleList`` of (>= 2) modules containing linears: its transformer blocks."""
    best: nn.ModuleList | None = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            n_blocks = sum(any(isinstance(x, nn.Linear) for x in b.modules()) for b in m)
            if n_blocks >= 2 and (best is None or n_blocks > len(best)):
                best = m
    return best


def _stages(model: nn.Module, targets: list[Target]) -> list[tuple[nn.Module | None, list[Target]]]:
    """``(block, targets)`` by transformer block in block order, then ``(None, the rest)``; see the module
    docstring."""
    best = _block_list(model)
    if best is None:
        return [(None, targets)]
    stages: list[tuple[nn.Module | None, list[Target]]] = []
    placed: set[int] = set()
    for block in best:
        ids = {id(x) for x in block.modules()}
        stage = [t for t in targets if id(t[2]) in ids]
        placed.update(id(t[2]) for t in stage)
        if stage:
            stages.append((block, stage))
    rest = [t for t in targets if id(t[2]) not in placed]
    return stages + ([(None, rest)] if rest else [])


BlockCall = tuple[tuple, dict]  # one batch's (args, kwargs) into a block


def _capture_block_inputs(block: nn.Module, run_calib: Callable[[], None]) -> list[BlockCall] | None:
    """Each calibration batch's ``(args, kwargs)`` into ``block`` (the batch stops there), or None when they
    cannot be replayed (see the module docstring)."""
    captured: list[BlockCall] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise StopCalibration

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            run_calib()
    finally:
        handle.remove()
    for args, kwargs in captured:
        caches = [a for a in (*args, *kwargs.values()) if isinstance(a, KVCache)]
        if not args or not isinstance(args[0], torch.Tensor) or any(not hasattr(c, "truncate") for c in caches):
            return None
    if captured:
        out = _run_block(block, captured[0])
        if not isinstance(out, torch.Tensor) or out.shape != captured[0][0][0].shape:
            return None
    return captured or None


def _run_block(block: nn.Module, call: BlockCall) -> torch.Tensor:
    """``block`` on one captured batch; its KV caches are emptied first (a block only reads its own layer's
    slots, which a previous run of it filled)."""
    args, kwargs = call
    for c in (*args, *kwargs.values()):
        if isinstance(c, KVCache):
            c.truncate(0)  # type: ignore[attr-defined]
    with torch.inference_mode():  # LLM's passes make their caches in inference mode
        return block(*args, **kwargs)


def _quantize_stage(
    stage: list[Target], method: GPTQMethod, run: Callable[[], object], stop_after: nn.Module | None = None
) -> None:
    """Hessians of the stage's linears over ``run``'s forward passes, then each replaced by its GPTQ module."""
    hessians = collect_hessians([t[2] for t in stage], run, stop_after)
    with torch.no_grad():
        for (parent, name, linear), h in zip(stage, hessians, strict=True):
            setattr(parent, name, method(linear, h))


def _quantize_replaying(
    blocks: nn.ModuleList, stages: list[tuple[nn.Module | None, list[Target]]], calls: list[BlockCall],
    run_calib: Callable[[], None], method: GPTQMethod,
) -> None:
    """Blocks in order on the captured inputs: Hessians, quantize, then the quantized block's outputs become
    the next block's inputs; the linears outside the blocks last, on whole calibration passes."""
    stage_of = {id(b): st for b, st in stages if b is not None}
    for i, block in enumerate(blocks):
        stage = stage_of.get(id(block))
        if stage:
            _quantize_stage(stage, method, lambda b=block, cs=calls: [_run_block(b, c) for c in cs])
        if i + 1 < len(blocks):
            calls = [((_run_block(block, c), *c[0][1:]), c[1]) for c in calls]
    for block, stage in stages:
        if block is None:
            _quantize_stage(stage, method, run_calib)


class StopCalibration(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook once a calibration batch has passed the block being calibrated.

    A ``run_calib`` that catches it around each batch (and says so with ``run_calib.stops_early = True``)
    lets :func:`gptq_quantize_model` skip the blocks after the one it calibrates: block ``i`` then costs
    ``i + 1`` blocks of compute instead of a whole pass, halving GPTQ's calibration time.
    """


def collect_hessians(
    linears: list[nn.Linear], run_calib: Callable[[], object], stop_after: nn.Module | None = None
) -> list[torch.Tensor]:
    """Run ``run_calib`` once with input hooks on ``linears``; return ``H = 2 X^T X / n`` for each.

    ``stop_after``: a module after whose forward each batch may stop (see :class:`StopCalibration`)."""
    sums = [torch.zeros(lin.in_features, lin.in_features, device=lin.weight.device) for lin in linears]
    rows = [0] * len(linears)

    def stop(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        raise StopCalibration

    def make_hook(i: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, module.in_features).float()
            sums[i].addmm_(x.t(), x)
            rows[i] += x.shape[0]

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(i)) for i, lin in enumerate(linears)]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        with torch.no_grad():
            run_calib()
    finally:
        for h in handles:
            h.remove()
    for lin, r in zip(linears, rows, strict=True):
        if r == 0:
            raise FrugalError(f"calibration never reached {lin}; run_calib must call the model's forward")
    return [2.0 * s / r for s, r in zip(sums, rows, strict=True)]


def gptq_quantize_model(model: nn.Module, spec: QuantSpec | str, run_calib: Callable[[], None]) -> nn.Module:
    """GPTQ-quantize ``model`` in place, block by block (module docstring); returns ``model``.

    ``run_calib`` runs the calibration batches (e.g. a list of token-id tensors) through ``model``; it is
    called once per transformer block. Embeddings (``embed`` flag) are round-to-nearest quantized first.
    """
    spec = as_spec(spec)
    if spec.method != "gptq":
        raise FrugalError(f"gptq_quantize_model got a {spec.method!r} spec; use quantize_model")
    method = GPTQMethod(spec)
    with torch.no_grad():
        quantize_embeddings(model, spec)
    early = getattr(run_calib, "stops_early", False)
    stages = _stages(model, target_linears(model, spec))
    blocks = _block_list(model)
    if early and blocks is not None:
        calls = _capture_block_inputs(blocks[0], run_calib)
        if calls is not None:
            _quantize_replaying(blocks, stages, calls, run_calib, method)
            return model
    for block, stage in stages:
        _quantize_stage(stage, method, run_calib, block if early else None)
    return model
