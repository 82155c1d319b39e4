"""Multi-LoRA serving: PEFT adapters (LoRA, rsLoRA, DoRA) run beside the base weights, batched across adapters.

- ``config.py``: ``AdapterConfig``, ``adapter_config.json`` validated (unsupported PEFT variants named).
- ``adapter.py``: ``LoraAdapter``, the safetensors factors mapped onto frugallm's fused projections and checked.
- ``punica.py``: one step's rows x their own adapters (``LoraBatch``): the native BGMV kernel, or two masked GEMMs.
- ``layer.py``: ``LoraLinear``, a base linear (any kind, never merged) with adapter slots; DoRA's row scales.
- ``manager.py``: ``LoraManager``, registered adapters, the LRU slots (``max_loras``) and per-forward binding.
"""

from frugallm.lora.adapter import LoraAdapter
from frugallm.lora.config import AdapterConfig
from frugallm.lora.manager import LoraManager, LoraRequest

__all__ = ["AdapterConfig", "LoraAdapter", "LoraManager", "LoraRequest"]
