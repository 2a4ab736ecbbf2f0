"""JLCM codebooks on token tables: ``nn.Embedding`` -> :class:`CodebookEmbedding` (a tied head reads the table)."""

from __future__ import annotations

from torch import nn

from ..compress import CompressionContext
from ..layers.codebook_embedding import CodebookEmbedding
from .jlcm import CodebookConfig, codebook_from_dense
from .tied import attach_tied_head, embedding_scale, table_sigma


def compress_codebook_embedding(module: nn.Embedding, config: CodebookConfig,
                                ctx: CompressionContext) -> CodebookEmbedding:
    """Quantize ``module.weight [V, d]`` with ``config`` (``Σ`` from :func:`table_sigma`; ``ctx.state`` is the tied
    head's input second moments or ``None``) and point a tied output head at the result."""
    sigma = table_sigma(module.embedding_dim, ctx.state)
    table, stats = codebook_from_dense(module.weight, None, config, sigma, who=ctx.name)
    scale = embedding_scale(module, ctx.name, "CodebookConfig")
    new = CodebookEmbedding.from_codebook(table, module.padding_idx, scale)  # decodes in the table's anchor dtype
    new.fit_stats = stats
    attach_tied_head(ctx, module, new, "compressed")
    return new
