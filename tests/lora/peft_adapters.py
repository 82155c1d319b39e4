"""PEFT adapters made on tiny transformers models (random factors, DoRA magnitudes perturbed), and peft references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig kwargs: plain LoRA on a subset, rsLoRA on all projections, DoRA on another subset.
VARIANTS: dict[str, dict] = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=8, lora_alpha=16, target_modules=ALL, use_rslora=True),
    "dora": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], use_dora=True),
}


def make_adapter(base_model, out: Path, seed: int, **lora_kw) -> Path:
    """Wrap a fresh copy of ``base_model`` (transformers, fp32) with a random PEFT LoRA and save it to ``out``."""
    import copy

    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(init_lora_weights=False, **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:  # else m == ||W + sBA|| and DoRA is plain LoRA
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    model.save_pretrained(str(out))
    return out


def peft_logits(base_model, adapter: Path, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits ``[len(ids), vocab]`` of ``base_model`` with the saved adapter, through peft."""
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
