"""Token tables and their tied output heads, shared by the embedding methods (TT, JLCM codebooks, subspace).

``tied_head_name`` finds a head sharing the table's weight, ``attach_tied_head`` points it at the compressed
table (or gives it a dense copy) and marks the model untied; ``table_sigma`` is the row-error metric of a table
whose head reads it (lookup error + the head's logit error).
"""

from __future__ import annotations

import torch
from torch import nn

from ..compress import CompressionContext
from ..layers.tt_embedding import TiedEmbeddingHead

__all__ = ["attach_tied_head", "embedding_scale", "table_sigma", "tied_head_name", "untie"]


def tied_head_name(model: nn.Module, embedding: nn.Module) -> str | None:
    """Name of the output head sharing ``embedding.weight`` (``lm_head``, ``proj_out``…), if any."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.data_ptr() != embedding.weight.data_ptr():
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def untie(model: nn.Module, names: tuple[str, ...]) -> None:
    """Mark the model untied (``tie_word_embeddings=False``) and drop tie entries touching ``names``."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
        tied = getattr(module, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            for key in [k for k, val in tied.items() if any(n in k or n in val for n in names)]:
                tied.pop(key)


def embedding_scale(module: nn.Module, who: str, config_name: str) -> float | None:
    """Check ``module`` is a token table; return its scalar ``embed_scale`` (Gemma's scaled embedding) or ``None``."""
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"hf_compress: {who} is a {type(module).__name__}; {config_name} compresses "
                        "nn.Embedding token tables only (e.g. pattern 'embed_tokens' or 'word_embeddings').")
    scale = getattr(module, "scalar_embed_scale", None)
    return None if scale is None else float(scale)


def attach_tied_head(ctx: CompressionContext, module: nn.Embedding, new: nn.Module, mode: str) -> None:
    """If the model's output head shares ``module.weight``: ``mode="compressed"`` swaps in a
    :class:`TiedEmbeddingHead` reading ``new`` (no parameters but the bias), ``"dense"`` gives the head its own dense
    copy of the table; either way the model is marked untied."""
    head_name = tied_head_name(ctx.model, module)
    if head_name is None:
        return
    head = ctx.model.get_submodule(head_name)
    if mode == "compressed":
        bias = getattr(head, "bias", None)
        tied = TiedEmbeddingHead(ctx.name, module.embedding_dim, module.num_embeddings, bias=bias is not None,
                                 device=module.weight.device, dtype=module.weight.dtype)
        if bias is not None:
            tied.bias.data.copy_(bias.detach())
        tied.tie(new, ctx.model)
        ctx.model.set_submodule(head_name, tied)
    else:
        head.weight = nn.Parameter(module.weight.detach().clone())
        if getattr(head, "bias", None) is not None:  # its own too: a bias shared through the dropped tie entries
            head.bias = nn.Parameter(head.bias.detach().clone())  # (BERT's) would be saved once, reloaded as zeros
    untie(ctx.model, (head_name, ctx.name))


def table_sigma(dim: int, head_sigma: torch.Tensor | None, head_weight: float = 1.0) -> torch.Tensor:
    """``Σ [d, d]`` of a token table: ``I`` (a lookup's error is its row's own error), plus the tied head's input
    second moments scaled to ``head_weight`` times the same trace when known (a row's logit error is
    ``(ŵ - w)ᵀ Σ_h (ŵ - w)``)."""
    eye = torch.eye(dim, device=None if head_sigma is None else head_sigma.device)
    if head_sigma is None:
        return eye
    return eye + head_sigma.float() * (head_weight * dim / torch.diagonal(head_sigma).sum().clamp_min(1e-12))
