"""Subspace embeddings (Jaiswal & Liu, "Lightweight Adaptation of Neural Language Models via Subspace Embedding",
CIKM'23): ``V·d`` embedding parameters become ``n·d`` (``f`` tables of ``n`` rows, ``n^f >= V``).

* ``assignment="modulo"``: token ``i`` -> ``(i mod n, i mod (n-1), …)``, distinct codes by the Chinese remainder
  theorem, every table's rows in use (or, when ``n`` is too small for that, the mixed radix
  ``(i mod b, ⌊i/b⌋ mod b, …)`` in the smallest base ``b`` with ``b^f >= V``, so every table varies; see
  ``layers.subspace``); nothing stored.
* ``assignment="context"``: product-quantize the pretrained table: weighted k-means per slice, then a greedy
  pass that gives **every token a distinct code** (highest calibration frequency first, each token takes the
  cheapest free cell of the code grid), then tables = per-row means; repeated ``refine_iters`` times. Stored as
  the ``codes [V, f]`` buffer.

Either way the tables start at the (weighted) mean of the pretrained slices that share each row, which is the
least-squares table for that assignment (training-free). :func:`distill` then trains only the tables (and
optionally norms) with ``transformers.Trainer`` so hidden states / logits match the dense model.
Tied heads reuse the TT-embedding helpers: ``tied_head="compressed"`` reads the compressed table
(``TiedEmbeddingHead``, factor-wise logits), ``"dense"`` unties and keeps a dense copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compress import CompressionContext
from ..config import MethodConfig, check_field_types
from ..layers.subspace import (
    ASSIGNMENTS,
    SubspaceEmbedding,
    check_rows,
    min_rows,
    split_widths,
)
from ..registry import register_method
from .tied import attach_tied_head, embedding_scale
from .tt_embedding import count_tokens

HEADS = ("compressed", "dense")
UNEVEN = ("last", "error")


@dataclass
class SubspaceEmbeddingConfig(MethodConfig):
    """Compress an ``nn.Embedding`` ``[V, d]`` into ``f = num_subspaces`` tables of ``n`` rows.

    ``n`` is ``num_rows``, else ``⌊param_fraction · V⌋`` (``param_fraction=0.01`` keeps 1% of the embedding
    parameters), else the smallest ``n`` with ``n^f >= V``.
    """

    registry_name = "subspace_embedding"

    num_subspaces: int = field(default=2, metadata={"help": "f: sub-vectors per token (tables)"})
    assignment: str = field(default="modulo", metadata={"help": f"one of {ASSIGNMENTS}"})
    num_rows: int | None = field(default=None, metadata={"help": "n: rows per table (n^f >= V)"})
    param_fraction: float | None = field(default=None, metadata={"help": "n = floor(fraction * V) if num_rows unset"})
    uneven_widths: str = field(default="last", metadata={"help": "d % f != 0: 'last' takes the remainder, 'error'"})
    tied_head: str = field(default="compressed", metadata={"help": f"tied output head: one of {HEADS}"})
    kmeans_iters: int = field(default=20, metadata={"help": "context: Lloyd iterations per slice"})
    refine_iters: int = field(default=2, metadata={"help": "context: (distinct assignment, means) rounds"})
    frequency_smoothing: float = field(default=1.0, metadata={"help": "token weight = calibration count + this"})
    factored_logits: bool = field(default=True, metadata={"help": "tied head: per-table logits, no [V, d] table"})
    seed: int = field(default=0, metadata={"help": "k-means seed"})

    def __post_init__(self) -> None:
        check_field_types(self)
        who = "SubspaceEmbeddingConfig"
        f = self.num_subspaces
        if not isinstance(f, int) or isinstance(f, bool) or f < 1:
            raise ValueError(f"hf_compress: {who}.num_subspaces (f) must be an int >= 1, got {f!r}.")
        for name, value, options in (("assignment", self.assignment, ASSIGNMENTS), ("tied_head", self.tied_head,
                                     HEADS), ("uneven_widths", self.uneven_widths, UNEVEN)):
            if value not in options:
                raise ValueError(f"hf_compress: {who}.{name} must be one of {options}, got {value!r}.")
        if self.num_rows is not None and self.param_fraction is not None:
            raise ValueError(f"hf_compress: {who}: give num_rows or param_fraction, not both.")
        if self.num_rows is not None and (not isinstance(self.num_rows, int) or self.num_rows < 1):
            raise ValueError(f"hf_compress: {who}.num_rows must be an int >= 1, got {self.num_rows!r}.")
        if self.param_fraction is not None and not 0.0 < float(self.param_fraction) <= 1.0:
            raise ValueError(f"hf_compress: {who}.param_fraction must be in (0, 1], got {self.param_fraction!r}.")
        if self.kmeans_iters < 0 or self.refine_iters < 0:
            raise ValueError(f"hf_compress: {who}.kmeans_iters and refine_iters must be >= 0.")

    def resolve(self, vocab: int, dim: int, who: str = "embedding") -> tuple[int, list[int]]:
        """``(n, widths)`` for a ``[V, d]`` table; clear ``ValueError`` for impossible settings."""
        widths = split_widths(dim, self.num_subspaces, who)
        if self.uneven_widths == "error" and dim % self.num_subspaces:
            raise ValueError(f"hf_compress: {who}: num_subspaces = {self.num_subspaces} does not divide the "
                             f"embedding dimension {dim}; use a divisor of {dim} or uneven_widths='last'.")
        if self.num_rows is not None:
            n = self.num_rows
        elif self.param_fraction is not None:
            n = max(1, math.floor(float(self.param_fraction) * vocab))
        else:
            n = min_rows(vocab, self.num_subspaces)
        check_rows(vocab, n, self.num_subspaces, who)
        if n >= vocab:
            import warnings

            warnings.warn(f"hf_compress: {who}: num_rows = {n} rows per table for a {vocab}-token vocabulary store "
                          "no fewer parameters than the dense table: nothing is saved; give num_rows < V (or "
                          "param_fraction < 1).", UserWarning, stacklevel=3)
        return n, widths


# ---------------------------------------------------------------------------------------------------------------
# clustering
# ---------------------------------------------------------------------------------------------------------------
def sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances ``x [m, w]`` to ``c [n, w]`` -> ``[m, n]`` (float32)."""
    x, c = x.float(), c.float()
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min_(0)


def nearest(x: torch.Tensor, c: torch.Tensor, k: int = 1, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``c [n, w]`` for every row of ``x [V, w]``: ``(dists [V, k], idx [V, k])``."""
    vals, idx = zip(*(sq_dists(x[s:s + chunk], c).topk(k, 1, largest=False) for s in range(0, x.shape[0], chunk)))
    return torch.cat(vals), torch.cat(idx)


def weighted_means(x: torch.Tensor, labels: torch.Tensor, n: int, weights: torch.Tensor,
                   fallback: torch.Tensor) -> torch.Tensor:
    """Per-label weighted mean of ``x [V, w]`` -> ``[n, w]``; empty labels keep their ``fallback`` row."""
    sums = torch.zeros(n, x.shape[1], dtype=torch.float64).index_add_(0, labels, x.double() * weights[:, None])
    mass = torch.zeros(n, dtype=torch.float64).index_add_(0, labels, weights)
    out = fallback.double().clone()
    used = mass > 0
    out[used] = sums[used] / mass[used, None]
    return out.float()


def kmeans(x: torch.Tensor, n: int, weights: torch.Tensor, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Weighted k-means of ``x [V, w]`` into ``n`` centroids ``[n, w]``: k-means++ init (a weighted sample of
    distinct rows when ``n > 512``, where n sequential k-means++ steps cost more than they gain), then Lloyd."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    if n > 512:
        c = x[torch.multinomial(weights.float(), n, replacement=False, generator=g)]
        for _ in range(iters):
            c = weighted_means(x, nearest(x, c)[1][:, 0], n, weights.double(), c)
        return c
    cent = [x[int(torch.multinomial(weights.float(), 1, generator=g))]]
    best = sq_dists(x, cent[0][None]).squeeze(1)  # [V]
    for _ in range(1, n):  # k-means++: next centroid drawn with probability ∝ weight · D²
        p = (weights.float() * best).clamp_min(0)
        i = int(torch.multinomial(p if p.sum() > 0 else weights.float(), 1, generator=g))
        cent.append(x[i])
        best = torch.minimum(best, sq_dists(x, x[i][None]).squeeze(1))
    c = torch.stack(cent)
    for _ in range(iters):
        labels = nearest(x, c)[1][:, 0]
        c = weighted_means(x, labels, n, weights.double(), c)
    return c


def distinct_codes(slices: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], priority: torch.Tensor,
                   top: int = 32, seed: int = 0) -> torch.Tensor:
    """Give every token a distinct code ``[V, f]`` minimizing ``Σ_k ‖x_k(v) - tables[k][c_k]‖²`` greedily.

    Tokens keep their per-slice nearest rows where no higher-``priority`` token took that cell; the others, in
    priority order, take the cheapest free cell among the candidates: the Cartesian product of the ``m`` nearest
    rows per slice while ``m^f <= 4096``, else (large ``f``) the best cell with one slice moved to one of its ``m``
    nearest rows (``f·m`` cells); ``m`` doubles until a cell is free. If even ``m = n`` finds none, free cells are
    drawn at random (``n^f >= V`` guarantees some exist). ``slices[k] [V, w_k]``, ``tables[k] [n, w_k]``,
    ``priority [V]``. Only the ``top`` nearest rows per slice are kept in memory (``[V, top]``), not ``[V, n]``.
    """
    f, v, n = len(slices), slices[0].shape[0], tables[0].shape[0]
    near = [nearest(x, t, min(n, top)) for x, t in zip(slices, tables)]  # f × ([V, top], [V, top])
    order = torch.sort(-priority.double(), stable=True).indices
    pos = torch.empty(v, dtype=torch.long)
    pos[order] = torch.arange(v)
    best = torch.stack([i[:, 0] for _, i in near], 1)  # [V, f]
    cells, inverse = torch.unique(best, dim=0, return_inverse=True)  # no packing: n^f may exceed int64
    first = torch.full((cells.shape[0],), v, dtype=torch.long).scatter_reduce_(0, inverse, pos, "amin")
    winner = first[inverse] == pos
    codes = best.clone()
    use_mask = n ** f <= 2 ** 28  # a bitmap over the code grid; else a set of code tuples
    radix = torch.tensor([n ** k for k in range(f)], dtype=torch.long) if use_mask else None
    taken: Any = torch.zeros(n ** f, dtype=torch.bool) if use_mask else set(map(tuple, cells.tolist()))
    if use_mask:
        taken[(cells * radix).sum(1)] = True
    gen = torch.Generator().manual_seed(seed)

    def per_slice(tok: int, m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``m`` nearest rows of each slice: ``f × (sq. distances [m], rows [m])``, nearest first."""
        if m <= near[0][0].shape[1]:
            return [(d[tok, :m], i[tok, :m]) for d, i in near]
        return [sq_dists(x[tok:tok + 1], t)[0].topk(m, largest=False) for x, t in zip(slices, tables)]

    def candidates(tok: int, m: int, cartesian: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Costs ``[c]`` and codes ``[c, f]`` of the candidate cells (see the docstring)."""
        per = per_slice(tok, m)
        if cartesian:
            cost = per[0][0].double()
            for d, _ in per[1:]:
                cost = (cost[..., None] + d.double()).reshape(-1)
            return cost, torch.cartesian_prod(*[i for _, i in per]) if f > 1 else per[0][1][:, None]
        base = torch.stack([i[0] for _, i in per])  # [f]
        base_cost = sum(float(d[0]) for d, _ in per)
        code = base.repeat(f * m, 1)  # row k·m + j: slice k moved to its j-th nearest row
        cost = torch.empty(f * m, dtype=torch.float64)
        for k, (d, i) in enumerate(per):
            code[k * m:(k + 1) * m, k] = i
            cost[k * m:(k + 1) * m] = base_cost - float(d[0]) + d.double()
        return cost, code

    def is_free(code: torch.Tensor) -> torch.Tensor:
        if use_mask:
            return ~taken[(code * radix).sum(1)]
        return torch.tensor([tuple(c) not in taken for c in code.tolist()])

    def random_free() -> torch.Tensor:
        while True:
            code = torch.randint(0, n, (256, f), generator=gen)
            free = is_free(code)
            if free.any():
                return code[int(free.nonzero()[0])]

    for tok in order[~winner[order]].tolist():
        m = min(n, max(2, min(8, int(4096 ** (1.0 / f)))))
        while True:
            cartesian = m ** f <= 4096
            cost, code = candidates(tok, m, cartesian)
            free = is_free(code)
            if free.any():
                chosen = code[int(torch.where(free, cost, torch.inf).argmin())]
                break
            if m == n:
                chosen = random_free()
                break
            m = min(n, m * 2)
        codes[tok] = chosen
        if use_mask:
            taken[int((chosen * radix).sum())] = True
        else:
            taken.add(tuple(chosen.tolist()))
    return codes


def context_codes(weight: torch.Tensor, widths: list[int], n: int, weights: torch.Tensor, iters: int,
                  refine: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Distinct context-based codes ``[V, f]`` and tables ``[n, w_k]`` for a pretrained ``weight [V, d]``."""
    slices = weight.detach().float().split(widths, 1)
    tables = [kmeans(x, n, weights, iters, seed + k) for k, x in enumerate(slices)]
    codes = None
    for _ in range(max(1, refine)):
        codes = distinct_codes(slices, tables, weights)
        tables = [weighted_means(x, codes[:, k], n, weights.double(), t) for k, (x, t) in enumerate(zip(slices,
                                                                                                        tables))]
    return codes, tables


def build_subspace(weight: torch.Tensor, config: SubspaceEmbeddingConfig, counts: torch.Tensor | None = None,
                   who: str = "embedding", **kwargs: Any) -> SubspaceEmbedding:
    """Compress ``weight [V, d]`` (``counts [V]``: calibration token counts, optional) into a SubspaceEmbedding."""
    v, d = weight.shape
    n, widths = config.resolve(v, d, who)
    weights = torch.ones(v, dtype=torch.float64) if counts is None else counts.double()
    weights = weights + float(config.frequency_smoothing)
    layer = SubspaceEmbedding(v, d, n, widths=widths, assignment=config.assignment,
                              factored_logits=config.factored_logits, device="cpu", dtype=weight.dtype, **kwargs)
    slices = weight.detach().float().cpu().split(widths, 1)
    if config.assignment == "modulo":
        codes = layer.all_codes()
        tables = [weighted_means(x, codes[:, k], n, weights, x.mean(0).expand(n, -1)) for k, x in enumerate(slices)]
    else:
        codes, tables = context_codes(weight.cpu(), widths, n, weights, config.kmeans_iters, config.refine_iters,
                                      config.seed)
        layer.set_codes(codes)
    with torch.no_grad():
        for p, t in zip(layer.tables, tables):
            p.copy_(t)
    return layer.to(weight.device)


# ---------------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------------
def prepare_subspace(model: nn.Module, targets: dict[str, SubspaceEmbeddingConfig], calibration: Any
                     ) -> dict[str, Any]:
    """Per target embedding: calibration token counts ``[V]`` (``None`` without calibration)."""
    return {name: count_tokens(calibration, model.get_submodule(name).num_embeddings) for name in targets
            if isinstance(model.get_submodule(name), nn.Embedding)}


def compress_subspace(module: nn.Module, config: SubspaceEmbeddingConfig, ctx: CompressionContext
                      ) -> nn.Module | None:
    scale = embedding_scale(module, ctx.name, "SubspaceEmbeddingConfig")  # Gemma's scaled embedding keeps its scale
    new = build_subspace(module.weight, config, ctx.state, who=ctx.name, padding_idx=module.padding_idx,
                         embed_scale=scale)
    attach_tied_head(ctx, module, new, config.tied_head)
    return new


register_method("subspace_embedding", SubspaceEmbeddingConfig, compress_subspace, prepare=prepare_subspace)


from .subspace_distill import distill, distillation_loss, isolated_token_rows  # noqa: E402  (re-exported)

__all__ = ["SubspaceEmbeddingConfig", "build_subspace", "distill", "distillation_loss", "distinct_codes",
           "isolated_token_rows"]
