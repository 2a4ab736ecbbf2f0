"""Subspace embeddings (Jaiswal & Liu, "Lightweight Adaptation of Neural Language Models via Subspace Embedding",
CIKM'23): ``V·d`` embedding parameters become ``n·d`` (``f`` tables of ``n`` rows, ``n^f >= V``).

* ``assignment="modulo"``: token ``i`` -> ``(i mod n, ⌊i/n⌋ mod n, …)``; nothing stored.
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
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compress import CompressionContext
from ..config import MethodConfig
from ..layers.subspace import (
    ASSIGNMENTS,
    SubspaceEmbedding,
    check_rows,
    code_dtype,
    min_rows,
    modulo_codes,
    split_widths,
)
from ..layers.tt_embedding import TiedEmbeddingHead
from ..registry import register_method
from .tt_embedding import attach_tied_head, count_tokens, embedding_scale

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
                   top: int = 32) -> torch.Tensor:
    """Give every token a distinct code ``[V, f]`` minimizing ``Σ_k ‖x_k(v) - tables[k][c_k]‖²`` greedily.

    Tokens keep their per-slice nearest rows where no higher-``priority`` token took that cell; the others, in
    priority order, take the cheapest free cell among the ``m`` nearest rows per slice (``m^f <= 4096`` at first,
    doubled until a cell is free; ``n^f >= V`` guarantees one). ``slices[k] [V, w_k]``, ``tables[k] [n, w_k]``,
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

    def candidates(tok: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Costs ``[m^f]`` and codes ``[m^f, f]`` of the Cartesian product of the m nearest rows per slice."""
        if m <= near[0][0].shape[1]:
            per = [(d[tok, :m], i[tok, :m]) for d, i in near]
        else:
            per = [sq_dists(x[tok:tok + 1], t)[0].topk(m, largest=False) for x, t in zip(slices, tables)]
        cost = per[0][0].double()
        for d, _ in per[1:]:
            cost = (cost[..., None] + d.double()).reshape(-1)
        code = torch.cartesian_prod(*[i for _, i in per]) if f > 1 else per[0][1][:, None]
        return cost, code

    start = max(2, min(8, int(4096 ** (1.0 / f))))  # at most ~4096 candidate cells per try
    for tok in order[~winner[order]].tolist():
        m = min(n, start)
        while True:
            cost, code = candidates(tok, m)
            if use_mask:
                free = ~taken[(code * radix).sum(1)]
                j = int(torch.where(free, cost, torch.inf).argmin()) if free.any() else None
            else:
                j = next((j for j in cost.argsort().tolist() if tuple(code[j].tolist()) not in taken), None)
            if j is not None:
                break
            if m == n:
                raise RuntimeError("hf_compress: subspace assignment found no free code; n^f < V?")
            m = min(n, m * 2)
        codes[tok] = code[j]
        if use_mask:
            taken[int((code[j] * radix).sum())] = True
        else:
            taken.add(tuple(code[j].tolist()))
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
        codes = modulo_codes(torch.arange(v), n, len(widths))
        tables = [weighted_means(x, codes[:, k], n, weights, x.mean(0).expand(n, -1)) for k, x in enumerate(slices)]
    else:
        codes, tables = context_codes(weight.cpu(), widths, n, weights, config.kmeans_iters, config.refine_iters,
                                      config.seed)
        layer.codes = codes.to(code_dtype(n))
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


# ---------------------------------------------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------------------------------------------
class _Distiller(nn.Module):
    """Trainer-facing wrapper: ``forward(input_ids)`` -> ``{"loss"}`` of the student against the frozen teacher.

    ``loss="hidden"``: mean over all hidden states of ``MSE(s, t) / mean(t²)``; ``"logits"``: token-mean
    ``KL(teacher ‖ student)``; ``"both"``: their sum. Both models stay in eval mode (no dropout).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: str) -> None:
        super().__init__()
        self.student, self.loss = student, loss
        self.__dict__["teacher"] = teacher  # not a submodule: never trained, not moved or saved

    def train(self, mode: bool = True) -> _Distiller:
        super().train(mode)
        self.student.eval()
        return self

    def forward(self, input_ids: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t = self.teacher(input_ids=input_ids, output_hidden_states=True)
        s = self.student(input_ids=input_ids, output_hidden_states=True)
        loss = input_ids.new_zeros((), dtype=torch.float32)
        if self.loss in ("hidden", "both"):
            terms = [(a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean().clamp_min(1e-12)
                     for a, b in zip(s.hidden_states, t.hidden_states)]
            loss = loss + torch.stack(terms).mean()
        if self.loss in ("logits", "both"):
            lt = torch.log_softmax(t.logits.float(), -1)
            ls = torch.log_softmax(s.logits.float(), -1)
            loss = loss + (lt.exp() * (lt - ls)).sum(-1).mean()
        return {"loss": loss}


def _register_output_recording(model: nn.Module) -> None:
    """Make ``output_hidden_states`` work on models re-typed in place by ``compress`` (transformers 5 keys its
    output-capturing registry by class, filled in ``PreTrainedModel.__init__``, which re-typing skips)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # older/newer transformers without the registry
        return
    for m in model.modules():
        flags = getattr(m, "_can_record_outputs", None)
        if flags and hasattr(m, "config") and not _CAN_RECORD_REGISTRY.get(m):
            _CAN_RECORD_REGISTRY[m] = flags


def distillation_loss(student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor],
                      loss: str = "auto") -> float:
    """Mean distillation loss of ``student`` over ``batches`` (each ``[b, seq]`` token ids), no gradients."""
    _register_output_recording(student)
    wrap = _Distiller(student, teacher, _loss_kind(student, loss)).eval()
    with torch.no_grad():
        return float(torch.stack([wrap(b)["loss"] for b in batches]).mean())


def _loss_kind(student: nn.Module, loss: str) -> str:
    if loss not in ("auto", "hidden", "logits", "both"):
        raise ValueError(f"hf_compress.subspace.distill: loss must be auto|hidden|logits|both, got {loss!r}.")
    if loss != "auto":
        return loss
    return "both" if any(isinstance(m, TiedEmbeddingHead) for m in student.modules()) else "hidden"


def distill(student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor], steps: int = 200,
            lr: float = 1e-3, batch_size: int = 8, loss: str = "auto", train_norms: bool = False,
            progress: bool = True, seed: int = 0) -> dict[str, float]:
    """Train only the student's subspace tables (and norms if ``train_norms``) to match ``teacher``.

    Args:
        student: model with :class:`SubspaceEmbedding` layers (trained in place).
        teacher: the dense model (frozen).
        batches: token-id tensors ``[b, seq]`` (e.g. ``benchmarks.data.calibration_batches``); rows are pooled.
        steps, lr, batch_size: AdamW steps (linear decay), learning rate, rows per step.
        loss: ``"hidden"`` (all hidden states), ``"logits"`` (KL), ``"both"``; ``"auto"`` = ``"both"`` with a
            tied compressed head (the head changed too), else ``"hidden"``.
    Returns ``{"loss_before", "loss_after", "trainable_params", "train_s"}`` (losses over ``batches``).
    """
    from transformers import Trainer, TrainingArguments

    kind = _loss_kind(student, loss)
    rows = [r for b in batches for r in b.reshape(-1, b.shape[-1])]
    if not rows or steps < 1:
        raise ValueError("hf_compress.subspace.distill: need at least one calibration batch and steps >= 1.")
    tables = [p for m in student.modules() if isinstance(m, SubspaceEmbedding) for p in m.tables]
    if not tables:
        raise ValueError("hf_compress.subspace.distill: the student has no SubspaceEmbedding; compress it first.")
    norms = [p for m in student.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)]
    flags = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    train = tables + (norms if train_norms else [])
    for p in train:
        p.requires_grad_(True)
    eval_batches = [torch.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    before = distillation_loss(student, teacher, eval_batches, kind)
    wrap = _Distiller(student, teacher, kind)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=lr, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0,
                                 logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=not progress, remove_unused_columns=False, seed=seed,
                                 dataloader_num_workers=0)
        trainer = Trainer(model=wrap, args=args, train_dataset=[{"input_ids": r} for r in rows],
                          data_collator=lambda feats: {"input_ids": torch.stack([f["input_ids"] for f in feats])})
        result = trainer.train()
    for p, flag in flags.items():
        p.requires_grad_(flag)
    student.eval()
    after = distillation_loss(student, teacher, eval_batches, kind)
    return {"loss_before": before, "loss_after": after, "trainable_params": sum(p.numel() for p in train),
            "train_s": float(result.metrics.get("train_runtime", 0.0)), "loss": kind}
