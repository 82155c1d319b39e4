"""``adapter_config.json`` of a PEFT LoRA adapter, validated: what frugallm runs and what it refuses by name."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugallm.errors import FrugalError

MAX_RANK = 64  # the largest rank frugallm accepts (the pools are sized by max_lora_rank <= this)

# PEFT LoRA options that change the computation in ways frugallm does not implement: each must be unset/false.
_UNSUPPORTED = {
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "modules_to_save": "modules_to_save (fully fine-tuned extra modules)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "alpha_pattern": "alpha_pattern (per-module alphas)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT LoRA config that set the computation.

    ``scaling(r)`` is the factor on ``B @ A`` of a module of rank ``r`` (``rank_pattern`` ranks come from the
    tensors): ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. ``use_dora``: a magnitude vector rescales each
    output row to ``m / ||W + s B A||_row`` (DoRA).
    """

    r: int
    alpha: float
    use_rslora: bool = False
    use_dora: bool = False

    def scaling(self, r: int) -> float:
        return self.alpha / (math.sqrt(r) if self.use_rslora else r)

    @classmethod
    def read(cls, folder: Path) -> AdapterConfig:
        path = folder / "adapter_config.json"
        try:
            raw: Any = json.loads(path.read_text())
        except FileNotFoundError:
            raise FrugalError(f"{folder} is not a PEFT adapter: no adapter_config.json") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FrugalError(f"cannot read {path}: {e}") from None
        if not isinstance(raw, dict):
            raise FrugalError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> AdapterConfig:
        kind = raw.get("peft_type", "LORA")
        if kind != "LORA":
            raise FrugalError(f"{where}: unsupported PEFT variant {kind!r}; frugallm runs LORA adapters "
                              "(LoRA, rsLoRA with use_rslora, DoRA with use_dora)")
        for key, what in _UNSUPPORTED.items():
            if raw.get(key):
                raise FrugalError(f"{where}: unsupported LoRA option {what}")
        if raw.get("bias", "none") != "none":
            raise FrugalError(f"{where}: unsupported LoRA option bias={raw['bias']!r} (only 'none')")
        r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
            raise FrugalError(f"{where}: rank r must be an integer in [1, {MAX_RANK}], got {r!r}")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise FrugalError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
        return cls(r, float(alpha), bool(raw.get("use_rslora")), bool(raw.get("use_dora")))
