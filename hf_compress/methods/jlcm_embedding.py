"""JLCM codebooks on token tables: ``nn.Embedding`` -> :class:`CodebookEmbedding` (a tied head reads the table)."""

from __future__ import annotations

import torch
from torch import nn

from ..compress import CompressionContext
from ..layers.codebook_embedding import CodebookEmbedding
from .jlcm import CodebookConfig, codebook_from_dense
from .tt_embedding import attach_tied_head, embedding_scale


def table_sigma(dim: int, head_sigma: torch.Tensor | None) -> torch.Tensor:
    """``Σ [d, d]`` of a token table: ``I`` (a lookup's error is its row's own error), plus the tied head's input
    second moments scaled to the same trace when known (a row's logit error is ``(ŵ - w)ᵀ Σ_h (ŵ - w)``)."""
    eye = torch.eye(dim)
    if head_sigma is None:
        return eye
    return eye + head_sigma.float() * (dim / torch.diagonal(head_sigma).sum().clamp_min(1e-12))


def compress_codebook_embedding(module: nn.Embedding, config: CodebookConfig,
                                ctx: CompressionContext) -> CodebookEmbedding:
    """Quantize ``module.weight [V, d]`` with ``config`` (``Σ`` from :func:`table_sigma`; ``ctx.state`` is the tied
    head's input second moments or ``None``) and point a tied output head at the result."""
    sigma = table_sigma(module.embedding_dim, ctx.state)
    table, stats = codebook_from_dense(module.weight, None, config, sigma, who=ctx.name)
    scale = embedding_scale(module, ctx.name, "CodebookConfig")
    new = CodebookEmbedding.from_codebook(table, module.padding_idx, scale)
    new.fit_stats = stats
    attach_tied_head(ctx, module, new, "compressed")
    return new
