"""Codebook token embedding: a ``[V, d]`` table stored as a :class:`CodebookLinear` weight (``out = V`` rows,
``in = d`` columns): bit-packed indices into small fp16 codebooks, the layout JLCM gives linear layers.

A lookup reads rows of the decoded table; a tied output head (``TiedEmbeddingHead``) multiplies by the same decoded
table, so an untied copy is never stored. The table is decoded by ``CodebookLinear.dense_weight``: in the default
``"cached"`` mode it stays in memory (``V·d`` in the model's dtype) until the codebooks, scales or indices change (the
checkpoint is small, the resident model is not); while codebooks or scales are trained it is rebuilt differentiably at
every call.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import register_layer
from .codebook import CodebookLinear
from .tt_embedding import CompressedEmbedding


@register_layer
class CodebookEmbedding(CompressedEmbedding):
    """Token table ``[num_embeddings, embedding_dim]`` held by ``self.table`` (a ``CodebookLinear`` with
    ``out_features = num_embeddings``, ``in_features = embedding_dim``, no bias)."""

    layer_type = "codebook_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, table: dict[str, Any] | CodebookLinear,
                 padding_idx: int | None = None, embed_scale: float | None = None) -> None:
        super().__init__(embedding_dim, padding_idx, embed_scale)
        if isinstance(table, dict):
            table = CodebookLinear.from_spec({**table, "bias": False})
        if (table.out_features, table.in_features) != (num_embeddings, embedding_dim) or table.bias is not None:
            raise ValueError(f"hf_compress: CodebookEmbedding({num_embeddings}x{embedding_dim}) needs a bias-free "
                             f"CodebookLinear({embedding_dim}->{num_embeddings}), got {table!r}.")
        self.num_embeddings = num_embeddings
        self.table = table

    @property
    def compute_dtype_anchor(self) -> torch.Tensor:
        """The table's: follows .to()/.half()/from_pretrained(dtype=), the dtype rows are decoded in (the fp16
        codebooks are storage and keep theirs)."""
        return self.table.compute_dtype_anchor

    @classmethod
    def from_codebook(cls, table: CodebookLinear, padding_idx: int | None = None,
                      embed_scale: float | None = None) -> CodebookEmbedding:
        """Wrap a quantized ``[V, d]`` table (``CodebookLinear(d -> V)``, e.g. from ``codebook_from_dense``)."""
        return cls(table.out_features, table.in_features, table, padding_idx=padding_idx, embed_scale=embed_scale)

    def _table(self) -> torch.Tensor:
        """The decoded ``[V, d]`` table in the model's dtype (``CodebookLinear.dense_weight``: cached unless being
        trained)."""
        return self.table.dense_weight(self.compute_dtype_anchor.dtype, self.table.codebooks.device)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded ``[V, d]`` table."""
        return self._table()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._table()[ids]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied-head logits ``hidden [..., d] @ tableᵀ`` -> ``[..., V]``."""
        return hidden @ self._table().to(hidden.dtype).T

    def storage_bytes(self) -> dict[str, int]:
        return self.table.storage_bytes()

    def spec(self) -> dict[str, Any]:
        return {**self._base_spec(), "table": {k: v for k, v in self.table.spec().items() if k != "type"}}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CodebookEmbedding:
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["table"], padding_idx=spec.get("padding_idx"),
                   embed_scale=spec.get("embed_scale"))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.table.bits}, n_groups={self.table.n_groups}"
