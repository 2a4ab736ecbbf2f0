"""Rank allocation of the adaptive TT embedding: token weights (calibration counts + a tokenizer-order prior),
exact (full-rank) special tokens, and the Lagrangian per-token rank choice.

Used at compress time only: the layer (:class:`~hf_compress.layers.tt_matrix.AdaptiveRankEmbedding`) stores the
chosen ranks, never the counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BudgetError

PRIORS = ("id_rank", "none")
HEAD_WEIGHTS = (0.0, 1.0, 4.0, 16.0)  # metric="auto" candidates; 0 = identity metric (lookup error only)
PROBE_TOKENS = 4096  # metric="auto": next-token loss over this many calibration tokens per candidate
PRIOR_OFFSET = 256.0  # Zipf offset: the first ~256 ids (bytes / specials in BPE vocabularies) weigh about alike


def count_tokens(calibration: Any, vocab_size: int) -> torch.Tensor | None:
    """Token frequencies ``[V]`` over calibration batches (tensors of ids, or dicts' ``*input_ids`` entries)."""
    if not calibration:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in calibration:
        tensors = [batch] if isinstance(batch, torch.Tensor) else [
            t for k, t in batch.items() if k.endswith("input_ids") and isinstance(t, torch.Tensor)]
        for ids in tensors:
            ids = ids.reshape(-1).long()
            ids = ids[(ids >= 0) & (ids < vocab_size)]
            counts += torch.bincount(ids, minlength=vocab_size).double()
    return counts


def id_rank_prior(vocab_size: int, exponent: float = 1.0) -> torch.Tensor:
    """Zipf pseudo-frequency ``[V]`` (float64, sums to 1) from the token id: ``p_v ∝ (v + 256)^-exponent``.

    Byte-level BPE (GPT-2, SmolLM2, Whisper) numbers tokens in merge order and SentencePiece (Gemma) by score, so
    a low id ~ a frequent token; a training-free prior for the tokens calibration never saw.
    """
    p = (torch.arange(vocab_size, dtype=torch.float64) + PRIOR_OFFSET).pow(-float(exponent))
    return p / p.sum()


def token_weights(counts: torch.Tensor | None, vocab_size: int, prior: str, prior_weight: float,
                  prior_exponent: float, smoothing: float) -> torch.Tensor | None:
    """Distortion weight ``[V]`` per token: ``counts + prior_weight · N · p_v + smoothing`` where ``N`` is the number
    of counted tokens (``V`` without calibration) and ``p`` the ``prior``; ``None`` (uniform) if neither exists."""
    if prior not in PRIORS:
        raise ValueError(f"hf_compress: TTEmbeddingConfig.prior must be one of {PRIORS}, got {prior!r}.")
    if counts is not None and (counts.ndim != 1 or counts.numel() != vocab_size):
        raise ValueError(f"hf_compress: adaptive embedding: token counts must be a [V={vocab_size}] vector, "
                         f"got shape {list(counts.shape)}.")
    if prior == "none" or prior_weight <= 0:
        return None if counts is None else counts.double() + smoothing
    total = float(counts.sum()) if counts is not None and float(counts.sum()) > 0 else float(vocab_size)
    w = prior_weight * total * id_rank_prior(vocab_size, prior_exponent) + smoothing
    return w if counts is None else w + counts.double()


def special_token_ids(model: nn.Module, vocab_size: int) -> list[int]:
    """Control-token ids named by ``model.config`` / ``generation_config`` (``*token_id(s)`` fields: BOS, EOS, PAD,
    decoder start, Whisper's no-timestamps / previous-SOT…), within ``[0, V)``."""
    ids: set[int] = set()
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        items = cfg.to_dict().items() if hasattr(cfg, "to_dict") else vars(cfg).items()
        for key, val in items:
            if not (key.endswith("token_id") or key.endswith("token_ids")):
                continue
            for x in (val if isinstance(val, (list, tuple)) else [val]):
                if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < vocab_size:
                    ids.add(x)
    return sorted(ids)


def _sqrt_and_inverse(metric: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M^{1/2}, M^{-1/2})`` (float64 ``[d, d]``) of a symmetric positive definite ``metric``."""
    evals, evecs = torch.linalg.eigh(metric.double())
    if not bool(evals.min() > 0):
        raise ValueError(f"hf_compress: {who}: the row metric must be positive definite (smallest eigenvalue "
                         f"{float(evals.min()):.3g}); add a multiple of the identity.")
    return (evecs * evals.sqrt()) @ evecs.T, (evecs * evals.rsqrt()) @ evecs.T


def adaptive_factors(weight: torch.Tensor, budget: float, weights: torch.Tensor | None, min_rank: int,
                     single_rank: int | None = None, exact: list[int] | None = None,
                     metric: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Factor ``weight [V, d]`` into ``basis [R_max, d]`` and per-tier ``coeffs [n_t, R_t]`` within ``budget``.

    ``basis`` = right singular vectors (orthonormal); token ``v`` keeps the first ``R_v`` coefficients, ``R_v``
    from the geometric ladder ``d, d/√2, d/2, … ≥ min_rank`` minimizing ``w_v · tail_v(R) + λ R`` with ``λ`` bisected
    to meet the budget (``basis`` included). ``weights [V]`` = ``w_v`` (:func:`token_weights`; all ones if
    ``None``); tokens in ``exact`` (control tokens) take the largest rank in use (full rank ``d``, i.e. exact,
    whenever the budget affords a rank-``d`` tier, as on every real checkpoint measured).
    ``single_rank`` gives the one-tier truncated SVD. ``metric [d, d]`` (symmetric positive definite): measure a
    row's error as ``δᵀ M δ`` instead of ``δᵀ δ`` (e.g. :func:`~hf_compress.methods.tied.table_sigma`:
    lookup error plus a tied head's logit error); the factors are found for ``W M^{1/2}`` and the basis mapped back
    by ``M^{-1/2}`` (same storage, basis no longer orthonormal). Returns ``(basis, coeffs, tier [V], slot [V])``.
    """
    v, d = weight.shape
    w = weight.detach().to(device="cpu", dtype=torch.float32)  # factored on the CPU (float64 Gram, bisection)
    if metric is not None:
        root, inv_root = _sqrt_and_inverse(metric.cpu(), f"adaptive embedding {v}x{d}")
        w = w @ root.float()
    gram = torch.zeros(d, d, dtype=torch.float64, device=w.device)
    for start in range(0, v, 16384):  # in chunks: a float64 copy of a 262k-row table would be 1.3 GB
        chunk = w[start:start + 16384].double()
        gram += chunk.T @ chunk
    _, evecs = torch.linalg.eigh(gram)
    basis_full = evecs.flip(1).T.to(torch.float32)  # [d, d], rows = right singular vectors by decreasing σ
    coeff = w @ basis_full.T  # [V, d]
    if metric is not None:
        basis_full = (basis_full.double() @ inv_root).float()  # ŵ = c (B M^{-1/2}): back to the table's space
    if single_rank is not None:
        r = single_rank
        return (basis_full[:r].to(weight), [coeff[:, :r].to(weight).contiguous()],
                torch.zeros(v, dtype=torch.int32), torch.arange(v, dtype=torch.int32))
    ladder = sorted({max(min_rank, min(d, round(d / 2 ** (i / 2)))) for i in range(40)}, reverse=True)
    csum = coeff.pow(2).cumsum_(1)  # [V, d] energy kept by the first r coefficients
    total = csum[:, -1]
    tails = torch.stack([total - csum[:, r - 1] for r in ladder], 1).clamp_min(0).double()  # [V, K]
    del csum
    weights = torch.ones(v, dtype=torch.float64) if weights is None else weights.double().cpu()
    dist = weights[:, None] * tails
    fixed = torch.tensor(sorted({int(i) for i in exact or [] if 0 <= int(i) < v}), dtype=torch.long)
    rk = torch.tensor(ladder, dtype=torch.float64)

    def assign(lam: float) -> tuple[torch.Tensor, float]:
        choice = (dist + lam * rk).argmin(1)
        choice[fixed] = choice.min()  # the largest rank in use (ladder[0] == d: exact rows when it is used)
        ranks = rk[choice]
        return choice, float(ranks.sum() + ranks.max() * d)

    lo, hi = 1e-12, float(dist.max()) + 1.0  # at hi every token takes the smallest rank
    choice, used = assign(hi)
    if used > budget:
        raise BudgetError(f"hf_compress: adaptive embedding: even rank {ladder[-1]} for every token exceeds the "
                          f"budget ({used:.0f} > {budget:.0f} params); lower compression or min_rank "
                          f"({fixed.numel()} control tokens kept at full rank).")
    for _ in range(80):  # bisect log λ: the smallest λ whose allocation fits the budget
        mid = math.sqrt(lo * hi)
        c, u = assign(mid)
        if u <= budget:
            hi, choice = mid, c
        else:
            lo = mid
    used_tiers = sorted(set(choice.tolist()))
    tier = torch.empty(v, dtype=torch.int32)
    slot = torch.empty(v, dtype=torch.int32)
    coeffs = []
    for t, k in enumerate(used_tiers):
        sel = (choice == k).nonzero().squeeze(1)
        tier[sel] = t
        slot[sel] = torch.arange(sel.numel(), dtype=torch.int32)
        coeffs.append(coeff[sel, : ladder[k]].to(weight).contiguous())
    r_max = ladder[used_tiers[0]]
    return basis_full[:r_max].to(weight), coeffs, tier, slot


def _scored(batch: Any, seq2seq: bool) -> tuple[dict[str, Any], torch.Tensor, bool] | None:
    """``(model kwargs, targets, shift)`` of a calibration batch: ``labels`` if given (-100 = ignored; causal LMs
    shift them, seq2seq models align them with the logits), else the (decoder) input ids with padding from the
    attention mask ignored and shifted by one; ``None`` if the batch has no ids to score."""
    kwargs = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
    if isinstance(kwargs.get("labels"), torch.Tensor):
        return kwargs, kwargs["labels"], not seq2seq
    ids = kwargs.get("decoder_input_ids" if seq2seq else "input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] < 2:
        return None
    mask = kwargs.get("decoder_attention_mask" if seq2seq else "attention_mask")
    return kwargs, (ids if mask is None else ids.masked_fill(mask == 0, -100)), True


def _valid(targets: torch.Tensor, shift: bool) -> torch.Tensor:
    return (targets[:, 1:] if shift else targets) != -100


def probe_batches(batches: Sequence[Any], seq2seq: bool = False, tokens: int = PROBE_TOKENS) -> list[Any]:
    """The first calibration batches (those with a target to score, see :func:`next_token_loss`) holding
    ``tokens`` tokens (non-padding ids, or labels other than -100)."""
    out, seen = [], 0
    for batch in batches:
        scored = _scored(batch, seq2seq)
        if scored is None or not bool(_valid(scored[1], scored[2]).any()):
            continue
        out.append(batch)
        seen += int((scored[1] != -100).sum())
        if seen >= tokens:
            break
    return out


@torch.no_grad()
def next_token_loss(model: nn.Module, batches: Sequence[Any]) -> float:
    """Mean next-token cross-entropy (nats per scored token) of a causal LM or seq2seq ``model`` on ``batches``:
    token ids ``[b, n]`` or dicts of model inputs, scored on their ``labels`` (-100 ignored) or else on their
    (decoder) input ids shifted by one, padding (``attention_mask == 0``) ignored."""
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            scored = _scored(batch, seq2seq)
            if scored is None:
                continue
            kwargs, targets, shift = scored
            logits = model(**kwargs).logits.float()
            if shift:
                logits, targets = logits[:, :-1], targets[:, 1:]
            targets = targets.to(logits.device)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("hf_compress: next_token_loss: no batch has token ids to score (input_ids, "
                         "decoder_input_ids or labels).")
    return total / count


def pick_head_weight(table: nn.Embedding, model: nn.Module, build: Callable[[float], nn.Module],
                     probe: Sequence[Any], candidates: Sequence[float] = HEAD_WEIGHTS
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """``metric="auto"``: build one compressed table per head weight in ``candidates`` (``build(w)``), measure the
    model's :func:`next_token_loss` on ``probe`` with that table written into ``table.weight`` (a tied head reads
    it too), restore the dense table and return the best layer with ``{"head_weight", "probe_loss": {w: loss}}``."""
    dense = table.weight.detach().clone()
    best: tuple[float, float, nn.Module] | None = None
    losses: dict[str, float] = {}
    try:
        for weight in candidates:
            with torch.no_grad():
                table.weight.copy_(dense)  # every candidate is built from the dense table
            layer = build(float(weight))
            with torch.no_grad():
                table.weight.copy_(layer.weight.to(dense.dtype))
            loss = next_token_loss(model, probe)
            losses[f"{float(weight):g}"] = round(loss, 5)
            if best is None or loss < best[0]:
                best = (loss, float(weight), layer)
    finally:
        with torch.no_grad():
            table.weight.copy_(dense)
    if best is None:
        raise ValueError("hf_compress: adaptive embedding: metric='auto' needs at least one head weight candidate.")
    return best[2], {"head_weight": best[1], "probe_loss": losses}
