"""``QuantEmbedding``: token embeddings stored as int8 rows or int4 groups, dequantized per looked-up row.

The table is held by a quantized linear (:class:`Int8Linear` or :class:`GroupQuantLinear`) whose rows are
the embedding rows, which is exactly the storage a tied ``lm_head`` needs: a tied head is replaced by that
same module, so the model keeps a single quantized copy of the matrix and the head gets the packed
kernels (the int4 CPU layout decodes single rows through its block permutation).
"""

from __future__ import annotations

import torch
from torch import nn

from frugallm.quant.group_linear import GroupQuantLinear
from frugallm.quant.groups import rtn_group_quantize
from frugallm.quant.int8 import Int8Linear, Int8State, quantize_int8_rows

EMBED_INT4_GROUP = 32


class QuantEmbedding(nn.Module):
    """Drop-in for ``nn.Embedding``: ``forward(ids [...]) -> [..., embedding_dim]`` in the original dtype."""

    def __init__(self, table: nn.Module, dtype: torch.dtype) -> None:
        """``table``: a quantized linear whose rows are the embeddings and that has ``dequantize_rows(ids)``
        (:class:`Int8Linear`, :class:`GroupQuantLinear`, or a GGUF file's blocks as ``GGUFLinear``)."""
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int | None = None) -> QuantEmbedding:
        """``bits`` 8 -> symmetric int8 per row; 4 -> asymmetric int4 groups of ``group_size`` (default 32)."""
        weight = emb.weight.detach()
        return cls(cls.table_from_weight(weight, bits, group_size), weight.dtype)

    @staticmethod
    def table_from_weight(
        weight: torch.Tensor, bits: int, group_size: int | None = None, bias: torch.Tensor | None = None
    ) -> Int8Linear | GroupQuantLinear:
        """The quantized table for ``weight [rows, dim]``; it is also a linear layer (a tied or untied head)."""
        bias = None if bias is None else bias.detach().clone()
        if bits == 8:
            q, s = quantize_int8_rows(weight)
            return Int8Linear(Int8State(q, s, bias))
        state = rtn_group_quantize(weight, 4, group_size or EMBED_INT4_GROUP)
        state.bias = bias
        return GroupQuantLinear(state)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize_rows(ids.reshape(-1))
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def weight_bytes(self) -> int:
        return self.table.weight_bytes()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
