"""Which modules a spec replaces: the target ``nn.Linear`` children, and embeddings with their tied heads.

Every ``nn.Linear`` except the one named ``lm_head`` (only with the ``head`` flag) and, with the ``embed``
flag, every ``nn.Embedding``. A tied ``lm_head`` (same weight tensor as an embedding) is never quantized
separately: with either flag the embedding is quantized once and the head becomes the same quantized table
(see ``embedding.py``); with neither flag both stay in full precision.
"""

from __future__ import annotations

from torch import nn

from frugallm.quant.embedding import QuantEmbedding
from frugallm.quant.spec import QuantSpec

Target = tuple[nn.Module, str, nn.Linear]  # (parent, attribute name, linear)


def table_bits(spec: QuantSpec) -> int:
    """Bit width of embedding tables (and of tied heads): ``head=8`` / ``embed=8``, else by the method."""
    return spec.embed_bits or (8 if spec.bits >= 6 else 4)


def _find_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    for parent in model.modules():
        child = dict(parent.named_children()).get("lm_head")
        if isinstance(child, nn.Linear):
            return parent, child
    return None


def quantize_embeddings(model: nn.Module, spec: QuantSpec) -> None:
    """Replace embeddings (``embed`` flag) and tied heads (either flag) by :class:`QuantEmbedding` storage."""
    head = _find_head(model)
    bits = table_bits(spec)
    for parent in list(model.modules()):
        for name, emb in list(parent.named_children()):
            if not isinstance(emb, nn.Embedding):
                continue
            tied = head is not None and head[1].weight is emb.weight
            if not (spec.include_embeddings or (tied and spec.include_lm_head)):
                continue
            qemb = QuantEmbedding.from_embedding(emb, bits, spec.group_size)
            setattr(parent, name, qemb)
            if tied and head is not None:
                head_parent, head_linear = head
                if head_linear.bias is not None:
                    qemb.table.bias = head_linear.bias.detach().clone()
                head_parent.lm_head = qemb.table


def target_linears(model: nn.Module, spec: QuantSpec) -> list[Target]:
    """The ``nn.Linear`` children to quantize, in module order."""
    embed_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: list[Target] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if not isinstance(child, nn.Linear):
                continue
            if name == "lm_head" and (not spec.include_lm_head or id(child.weight) in embed_weights):
                continue
            out.append((parent, name, child))
    return out
