"""Training-free tensor-train compression of token embeddings (TensorSLM) and better TT formats.

Formats (``TTEmbeddingConfig.format``), all sized by the same parameter budget ``V·d / compression``:

* ``"per_token"`` — the paper: each row ``w_v`` reshaped to ``n_1 × … × n_N`` and TT-SVD'd on its own (batched over
  the vocabulary, one batched SVD per mode); ranks fixed, chosen from the budget, or from a tolerance ``eps``.
* ``"tt_matrix"`` — TT-matrix over (vocabulary × hidden) modes, initialized by TT-SVD of the reshaped table.
* ``"adaptive"`` (default) — two-core TT ``[V, R] × [R, d]`` whose vocabulary core has a per-token rank chosen by
  a Lagrangian allocation of the budget: distortion = token weight × energy lost, the weight = calibration count
  + a Zipf prior from the token id (``prior="id_rank"``: BPE merge order / SentencePiece score order) + smoothing;
  control tokens (BOS/EOS/PAD/decoder-start… from the model's configs, plus ``exact_ids``) keep full rank. A row's
  error is measured as ``δᵀ(I + c·Σ_h·d/tr Σ_h)δ`` where ``Σ_h`` is the tied head's input second moments (its
  logit error; ``metric="head"``, weight ``c = head_weight``); ``metric="auto"`` (default) tries ``c`` in
  ``HEAD_WEIGHTS`` (0 = lookup error only) and keeps the lowest next-token loss on calibration batches.
* ``"svd"`` — the whole-matrix truncated-SVD baseline (one tier of ``"adaptive"``), measured through the same path.

Tied output heads (``lm_head`` / ``proj_out`` sharing the embedding's weight) are handled explicitly:
``tied_head="compressed"`` installs a :class:`TiedEmbeddingHead` reading the compressed table (no extra parameters),
``tied_head="dense"`` unties the head and keeps a dense copy (``V·d`` more parameters on tied models).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compress import CompressionContext
from ..config import BudgetError, CalibrationRequiredError, MethodConfig, check_field_types
from ..layers.tt_embedding import TTEmbedding, check_tt_shape_ranks
from ..layers.tt_matrix import AdaptiveRankEmbedding, TTMatrixEmbedding
from ..registry import register_method
from .tied import attach_tied_head, embedding_scale, table_sigma, tied_head_name, untie  # noqa: F401  (re-exported)
from .tt_adaptive import (
    PRIORS,
    PROBE_TOKENS,
    adaptive_factors,
    count_tokens,
    pick_head_weight,
    probe_batches,
    special_token_ids,
    token_weights,
)
from .tt_ranks import check_reachable, choose_tt_ranks, factorize, tt_params, vocab_factors

__all__ = ["TTEmbeddingConfig", "adaptive_factors", "build_embedding", "count_tokens", "prepare_tt"]

FORMATS = ("adaptive", "per_token", "tt_matrix", "svd")
HEADS = ("compressed", "dense")
METRICS = ("auto", "identity", "head")


@dataclass
class TTEmbeddingConfig(MethodConfig):
    """Compress an ``nn.Embedding`` ``[V, d]`` without training.

    Size it with exactly one of ``compression`` (embedding parameters ÷ compressed parameters, default 2),
    ``ranks`` (TT ranks ``r_1..r_{N-1}`` for ``per_token``/``tt_matrix``; ``[R]`` for ``svd``) or ``eps``
    (``per_token`` only: relative TT-SVD error per token; all rows share the largest rank any row needs, and a
    tolerance that saves nothing raises ``BudgetError``). Ranks must be ones TT-SVD can fill
    (``r_k <= r_{k-1}·n_k``, ``r_k <= n_{k+1}·r_{k+1}``); the budget search only picks such ranks.
    """

    registry_name = "tt_embedding"

    format: str = field(default="adaptive", metadata={"help": f"one of {FORMATS}"})
    compression: float | None = field(default=2.0, metadata={"help": "target parameter ratio dense/compressed"})
    ranks: list[int] | None = field(default=None, metadata={"help": "explicit TT ranks r_1..r_{N-1}"})
    eps: float | None = field(default=None, metadata={"help": "per-token TT-SVD relative error tolerance"})
    shape: list[int] | None = field(default=None, metadata={"help": "factors n_1..n_N of d (auto if None)"})
    order: int = field(default=3, metadata={"help": "number of hidden factors N when shape is None"})
    vocab_shape: list[int] | None = field(default=None, metadata={"help": "tt_matrix: factors of V (auto if None)"})
    tied_head: str = field(default="compressed", metadata={"help": f"tied output head: one of {HEADS}"})
    frequency_smoothing: float = field(default=0.1, metadata={"help": "adaptive: weight = count + prior + this"})
    prior: str = field(default="id_rank", metadata={"help": f"adaptive: token-frequency prior, one of {PRIORS}"})
    prior_weight: float = field(default=4.0, metadata={"help": "adaptive: prior mass ÷ calibration token count"})
    prior_exponent: float = field(default=1.0, metadata={"help": "adaptive: Zipf exponent of the id_rank prior"})
    keep_special: bool = field(default=True, metadata={"help": "adaptive: control tokens of the model's configs "
                                                                 "keep full rank"})
    exact_ids: list[int] | None = field(default=None, metadata={"help": "adaptive: more token ids kept at full "
                                                                        "rank (e.g. tokenizer.all_special_ids)"})
    min_rank: int = field(default=8, metadata={"help": "adaptive: smallest per-token rank"})
    metric: str = field(default="auto", metadata={"help": f"adaptive: row error metric, one of {METRICS} "
                                                           "('head': + the tied head's logit error, needs "
                                                           "calibration; 'auto': the head weight among "
                                                           "HEAD_WEIGHTS (0 = identity) with the lowest loss on "
                                                           "the first ~4k calibration tokens, candidates ranked by "
                                                           "the counts of the rest; identity without calibration "
                                                           "or tied head)"})
    head_weight: float = field(default=1.0, metadata={"help": "metric='head': weight of the head's logit error "
                                                               "relative to the lookup error (equal traces at 1)"})

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.format not in FORMATS:
            raise ValueError(f"hf_compress: TTEmbeddingConfig.format must be one of {FORMATS}, got {self.format!r}.")
        if self.tied_head not in HEADS:
            raise ValueError(f"hf_compress: TTEmbeddingConfig.tied_head must be one of {HEADS}, "
                             f"got {self.tied_head!r}.")
        if self.ranks is not None or self.eps is not None:
            self.compression = None
        given = [k for k in ("compression", "ranks", "eps") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("hf_compress: TTEmbeddingConfig needs exactly one of compression, ranks, eps; "
                             f"got {given}.")
        if self.compression is not None and not float(self.compression) > 1.0:
            raise ValueError(f"hf_compress: TTEmbeddingConfig.compression must be > 1, got {self.compression!r}.")
        if self.ranks is not None and any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise ValueError(f"hf_compress: TTEmbeddingConfig.ranks must be ints >= 1, got {self.ranks!r} "
                             "(rank 0 would erase the embedding).")
        if self.eps is not None and (self.format != "per_token" or not 0.0 < self.eps < 1.0):
            raise ValueError("hf_compress: TTEmbeddingConfig.eps needs format='per_token' and 0 < eps < 1.")
        if self.adaptive_like and self.ranks is not None and len(self.ranks) != 1:
            raise ValueError("hf_compress: format='svd'/'adaptive' takes ranks=[R] (one rank), "
                             f"got {self.ranks!r}.")
        if self.prior not in PRIORS:
            raise ValueError(f"hf_compress: TTEmbeddingConfig.prior must be one of {PRIORS}, got {self.prior!r}.")
        if not (self.prior_weight >= 0 and self.frequency_smoothing >= 0 and self.prior_exponent >= 0):
            raise ValueError("hf_compress: TTEmbeddingConfig.prior_weight, prior_exponent and frequency_smoothing "
                             "must be >= 0.")
        if self.exact_ids is not None and any(not isinstance(i, int) or i < 0 for i in self.exact_ids):
            raise ValueError("hf_compress: TTEmbeddingConfig.exact_ids must be token ids >= 0, "
                             f"got {self.exact_ids!r}.")
        if self.metric not in METRICS:
            raise ValueError(f"hf_compress: TTEmbeddingConfig.metric must be one of {METRICS}, got {self.metric!r}.")
        if not self.head_weight > 0:
            raise ValueError(f"hf_compress: TTEmbeddingConfig.head_weight must be > 0, got {self.head_weight!r}.")
        if self.order < 1 or self.min_rank < 1:
            raise ValueError("hf_compress: TTEmbeddingConfig.order and min_rank must be >= 1.")
        unused = [k for k, formats in (("shape", ("per_token", "tt_matrix")), ("vocab_shape", ("tt_matrix",)))
                  if getattr(self, k) is not None and self.format not in formats]
        if unused:  # (they were ignored silently)
            raise ValueError(f"hf_compress: TTEmbeddingConfig.{unused[0]} shapes the tensor train of format "
                             f"'per_token'/'tt_matrix'; format={self.format!r} does not use it: leave it None.")

    @property
    def adaptive_like(self) -> bool:
        return self.format in ("svd", "adaptive")


# ---------------------------------------------------------------------------------------------------------------
# TT-SVD (shapes and ranks: methods.tt_ranks)
# ---------------------------------------------------------------------------------------------------------------
def tt_svd_rows(x: torch.Tensor, shape: list[int], ranks: list[int] | None = None,
                eps: float | None = None) -> list[torch.Tensor]:
    """Batched TT-SVD: every row of ``x [B, ∏ shape]`` as its own tensor train (one batched SVD per mode).

    Returns cores ``[B, r_{k-1}, n_k, r_k]``. With ``ranks`` the cores are truncated (zero-padded where a row's
    unfolding has lower rank); with ``eps`` each mode's rank is the largest any row needs for
    ``‖w - ŵ‖ ≤ eps‖w‖`` (TT-SVD tolerance ``eps/√(N-1)`` per mode).
    """
    b, n_modes = x.shape[0], len(shape)
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rest = x.to(work_dtype).reshape(b, 1, -1)
    delta2 = None
    if eps is not None:
        delta2 = (eps ** 2 / max(1, n_modes - 1)) * rest.pow(2).sum((1, 2))  # [B]
    cores: list[torch.Tensor] = []
    for k in range(n_modes - 1):
        r_prev = rest.shape[1]
        mat = rest.reshape(b, r_prev * shape[k], -1)
        u, s, vh = _batched_svd(mat)
        if delta2 is not None:
            tail = s.pow(2).flip(1).cumsum(1).flip(1)  # tail[:, j] = Σ_{i≥j} s_i²
            need = (tail > delta2[:, None]).sum(1)  # rows' minimal rank
            r = max(1, int(need.max()))
        else:
            r = ranks[k]
        keep = min(r, s.shape[1])
        core = u[:, :, :keep]
        rest = s[:, :keep, None] * vh[:, :keep]
        if keep < r:  # pad to the requested rank with zeros
            core = torch.cat([core, core.new_zeros(b, core.shape[1], r - keep)], 2)
            rest = torch.cat([rest, rest.new_zeros(b, r - keep, rest.shape[2])], 1)
        cores.append(core.reshape(b, r_prev, shape[k], r).to(x.dtype))
    cores.append(rest.reshape(b, rest.shape[1], shape[-1], 1).to(x.dtype))
    return cores


def _batched_svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd`` of ``mat [B, m, n]`` on one CPU thread: many small SVDs are ~10x slower multi-threaded
    (measured: 49k x 576 table, 65 s on 2 threads vs 6 s on 1)."""
    if mat.device.type != "cpu":
        return torch.linalg.svd(mat, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(mat, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------------
def prepare_tt(model: nn.Module, targets: dict[str, TTEmbeddingConfig], calibration: Any) -> dict[str, Any]:
    """Per target embedding: ``{"counts": [V] calibration token counts or None, "special": control-token ids}``,
    plus ``"head_sigma"`` (the tied head's input ``XᵀX/n [d, d]`` over the first ~16k calibration tokens) for
    ``metric="head"`` / ``"auto"`` and ``"probe"`` (the batches ``"auto"`` scores its candidates on).
    Encoder-decoder models (Whisper) run only the dict batches (``{"input_features", "decoder_input_ids"}``: audio
    with its transcript); bare id tensors there only add to the token counts."""
    out = {}
    heads = {}
    for name, config in targets.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            out[name] = {"counts": count_tokens(calibration, module.num_embeddings),
                         "special": special_token_ids(model, module.num_embeddings)}
            head = tied_head_name(model, module)
            weighted = config.format == "adaptive" and config.metric != "identity"
            if weighted and head and config.tied_head == "compressed":
                heads[name] = head
    if not heads:
        return out
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    runnable = [b for b in calibration or [] if isinstance(b, Mapping) or not seq2seq]  # seq2seq: bare ids only count
    # one row per id tensor: the probe stops at ~PROBE_TOKENS even when the calibration is one large batch
    probe = probe_batches([r[None] for b in runnable for r in b] if not seq2seq and all(
        isinstance(b, torch.Tensor) and b.ndim == 2 for b in runnable) else runnable, seq2seq)
    generative = callable(getattr(model, "can_generate", None)) and bool(model.can_generate())
    if not (probe and generative):  # metric="auto" scores next-token loss: else it falls back to identity
        heads = {n: h for n, h in heads.items() if targets[n].metric == "head"}
    if heads and not runnable:
        raise CalibrationRequiredError("hf_compress: TTEmbeddingConfig(metric='head') weighs rows by the tied head's "
                                       "input "
                         "statistics: pass calibration batches the model can run (encoder-decoder models: dicts "
                         "such as {'input_features', 'decoder_input_ids'}), or use metric='identity'.")
    if heads:
        from ..calibration import input_covariances

        stats_batches = probe_batches(runnable, seq2seq, 4 * PROBE_TOKENS) or runnable
        found = input_covariances(model, sorted(set(heads.values())), stats_batches)
        for name, head in heads.items():
            out[name]["head_sigma"] = found[head].float().cpu()
            if targets[name].metric == "auto":
                out[name]["probe"] = probe
                counts = out[name]["counts"]  # the candidates count tokens on the rest: the probe text is held out
                probe_counts = count_tokens(probe, counts.numel())
                held = (counts - probe_counts).clamp_min(0)
                # less calibration beyond the probe than the probe itself is too little to rank tokens by: all
                # counts then (not held out)
                out[name]["probe_counts"] = held if held.sum() >= probe_counts.sum() else counts
    return out


def build_embedding(weight: torch.Tensor, config: TTEmbeddingConfig, counts: torch.Tensor | None = None,
                    who: str = "embedding", special: list[int] | None = None,
                    head_sigma: torch.Tensor | None = None, **kwargs: Any) -> nn.Module:
    """Compress a table ``weight [V, d]`` into the format of ``config`` (``kwargs`` -> layer, e.g. embed_scale).

    ``counts [V]``: calibration token counts; ``special``: control-token ids; ``head_sigma [d, d]``: the tied head's
    input second moments (``metric="head"``); all three used by ``"adaptive"`` only."""
    v, d = weight.shape
    budget = None if config.compression is None else v * d / float(config.compression)
    if budget is not None and config.format != "per_token":  # the per-token index buffers stored beside the factors
        budget -= 8 * v / weight.element_size()  # (tier + slot int32, or row_index int64): 8 bytes per token
    shape = list(config.shape) if config.shape is not None else factorize(d, config.order)
    if config.format == "per_token":
        if config.eps is not None:
            check_tt_shape_ranks(d, shape, [1] * (len(shape) - 1), who)
            layer = TTEmbedding.from_dense(weight, shape, eps=config.eps, **kwargs)
            per_token = tt_params(shape, layer.ranks)
            if per_token >= d:  # every row shares the largest rank any row needs
                raise BudgetError(f"hf_compress: {who}: eps={config.eps} needs TT ranks {layer.ranks} (the largest "
                                  f"any token needs), {per_token} parameters per token >= the dense {d}: nothing is "
                                  "saved. Raise eps, or give compression= or ranks=.")
            return layer
        ranks = list(config.ranks) if config.ranks is not None else None
        if ranks is None:
            check_tt_shape_ranks(d, shape, [1] * (len(shape) - 1), who)
            ranks = choose_tt_ranks(shape, budget / v, who)
        check_tt_shape_ranks(d, shape, ranks, who)
        check_reachable(shape, ranks, who)
        _saves(tt_params(shape, ranks) * v, v * d, f"TT ranks {ranks}", who)
        return TTEmbedding.from_dense(weight, shape, ranks=ranks, **kwargs)
    if config.format == "tt_matrix":
        check_tt_shape_ranks(d, shape, [1] * (len(shape) - 1), who)
        vocab_shape = list(config.vocab_shape) if config.vocab_shape is not None else vocab_factors(v, len(shape))
        if len(vocab_shape) != len(shape) or any(int(f) < 1 for f in vocab_shape) or math.prod(vocab_shape) < v:
            raise ValueError(f"hf_compress: {who}: vocab_shape {vocab_shape} must have {len(shape)} factors (one per "
                             f"hidden factor of {shape}) whose product covers V = {v}; e.g. "
                             f"{vocab_factors(v, len(shape))}, or leave it None.")
        modes = [a * b for a, b in zip(vocab_shape, shape)]
        ranks = list(config.ranks) if config.ranks is not None else choose_tt_ranks(modes, budget, who)
        check_tt_shape_ranks(math.prod(modes), modes, ranks, who)
        check_reachable(modes, ranks, who)
        _saves(tt_params(modes, ranks), v * d, f"TT-matrix ranks {ranks}", who)
        return TTMatrixEmbedding.from_dense(weight, vocab_shape, shape, ranks, **kwargs)
    # svd / adaptive
    if config.ranks is not None:
        if not 1 <= config.ranks[0] <= min(v, d):
            raise ValueError(f"hf_compress: {who}: rank {config.ranks[0]} must be in [1, min(V, d) = {min(v, d)}].")
        single = config.ranks[0]
        _saves(single * (v + d), v * d, f"rank {single}", who)
    elif config.format == "svd":
        single = min(d, int(budget // (v + d)))
        if single < 1:
            raise BudgetError(f"hf_compress: {who}: even a rank-1 SVD ({v + d} parameters + the index buffers) "
                              f"exceeds the budget of {config.compression}x; lower the compression ratio.")
    else:
        single = None
    weights, exact = None, None
    if config.format == "adaptive":
        weights = token_weights(counts, v, config.prior, config.prior_weight, config.prior_exponent,
                                config.frequency_smoothing)
        exact = [*(special or [] if config.keep_special else []), *(config.exact_ids or [])]
    metric = None
    if config.format == "adaptive" and config.metric != "identity" and head_sigma is not None:
        metric = table_sigma(d, head_sigma, config.head_weight)
    if config.min_rank > min(v, d):
        raise ValueError(f"hf_compress: {who}: min_rank {config.min_rank} exceeds min(V, d) = {min(v, d)}; lower it.")
    basis, coeffs, tier, slot = adaptive_factors(weight, budget, weights, config.min_rank, single, exact, metric)
    return AdaptiveRankEmbedding.from_factors(basis, coeffs, tier, slot, **kwargs)


def _saves(params: int, dense: int, what: str, who: str) -> None:
    """Warn when explicit sizes store no fewer parameters than the dense table (exact, but no compression)."""
    if params >= dense:
        warnings.warn(f"hf_compress: {who}: {what} store {params} parameters, not fewer than the dense table's "
                      f"{dense}: nothing is saved; give smaller ranks, or compression= instead.", UserWarning,
                      stacklevel=3)


def compress_tt_embedding(module: nn.Module, config: TTEmbeddingConfig, ctx: CompressionContext) -> nn.Module | None:
    scale = embedding_scale(module, ctx.name, "TTEmbeddingConfig")
    state = ctx.state or {}

    def build(cfg: TTEmbeddingConfig, counts: torch.Tensor | None) -> nn.Module:
        return build_embedding(module.weight, cfg, counts, who=ctx.name, special=state.get("special"),
                               head_sigma=state.get("head_sigma"), padding_idx=module.padding_idx, embed_scale=scale)

    def weighted(w: float) -> TTEmbeddingConfig:
        return dataclasses.replace(config, metric="head" if w > 0 else "identity", head_weight=w if w > 0 else 1.0)

    if config.metric == "auto" and state.get("probe"):
        # candidates sized by the counts without the probe text, so the probe scores text the ranks did not see;
        # the chosen head weight is then built from all counts
        _, choice = pick_head_weight(module, ctx.model, lambda w: build(weighted(w), state["probe_counts"]),
                                     state["probe"])
        new = build(weighted(choice["head_weight"]), state.get("counts"))
        new.metric_choice = {**choice, "held_out": state["probe_counts"] is not state.get("counts")}
    else:
        new = build(config, state.get("counts"))
    attach_tied_head(ctx, module, new, config.tied_head)
    return new


register_method("tt_embedding", TTEmbeddingConfig, compress_tt_embedding, prepare=prepare_tt)
