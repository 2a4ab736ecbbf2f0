"""Sentence-embedding quality: Lee50 document similarity, polarity classification, word similarity.

Embedding = mean of the last hidden states over the attention mask, L2-normalised (sentence-transformers' pooling
for all-MiniLM-L6-v2, max 256 tokens). Dense MiniLM-L6 reference figures: Lee50 0.51, polarity 0.75,
WordSim353 0.73, SimLex999 0.45 (``/work/shared/REAL_MODELS.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block and restore its training flag after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameterless module)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation of two 1-D sequences (average ranks for ties)."""
    rx, ry = rankdata(np.asarray(x, dtype=np.float64)), rankdata(np.asarray(y, dtype=np.float64))
    if rx.shape != ry.shape or rx.ndim != 1 or rx.size < 2:
        raise ValueError(f"spearman: need two 1-D sequences of equal length >= 2, got {rx.shape} and {ry.shape}")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


@torch.inference_mode()
def sentence_embeddings(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                        max_length: int = 256) -> torch.Tensor:
    """``[n, d]`` float32 CPU tensor: masked mean of the last hidden state, L2-normalised, one row per text."""
    if not texts:
        raise ValueError("sentence_embeddings: no texts")
    device, rows = model_device(model), []
    with eval_mode(model):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            out = model(**enc)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(rows)


def lee50_spearman(model: Any, tokenizer: Any) -> float:
    """Spearman between embedding cosine similarities of the 50 Lee documents and the human matrix (upper triangle,
    diagonal excluded: 1225 pairs)."""
    from .data import lee50

    docs, human = lee50()
    emb = sentence_embeddings(model, tokenizer, docs).double().numpy()
    iu = np.triu_indices(len(docs), k=1)
    return spearman((emb @ emb.T)[iu], human[iu])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 100,
                 tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """Binary L2-regularised logistic regression by Newton's method; ``x [n, d]``, ``y [n]`` in {0, 1}.

    Minimises ``sum(logloss) + l2/2 * ||w||^2`` (bias unpenalised; ``l2 = 1`` matches sklearn's default ``C = 1``).
    Returns ``(w [d], b)``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("fit_logistic: labels must be 0/1")
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    reg = np.full(d + 1, l2)
    reg[-1] = 1e-8  # bias: unpenalised, tiny ridge for a well-posed Hessian
    theta = np.zeros(d + 1)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(xb @ theta)))
        grad = xb.T @ (p - y) + reg * theta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if float(np.abs(step).max()) < tol:
            break
    return theta[:-1], float(theta[-1])


def stratified_folds(y: np.ndarray, folds: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Index arrays of ``folds`` stratified folds: each class shuffled (seeded) and dealt round-robin."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for cls in np.unique(y):
        for j, i in enumerate(rng.permutation(np.flatnonzero(y == cls)).tolist()):
            parts[(offset + j) % folds].append(i)
        offset += int((y == cls).sum())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def cv_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 10, seed: int = 0, l2: float = 1.0) -> float:
    """Stratified k-fold cross-validated accuracy of :func:`fit_logistic` (total correct / n)."""
    n = len(y)
    if not 2 <= folds <= n:
        raise ValueError(f"cv_accuracy: folds must be in [2, {n}], got {folds}")
    correct = 0
    for test in stratified_folds(y, folds, seed):
        train = np.setdiff1d(np.arange(n), test)
        w, b = fit_logistic(x[train], y[train], l2=l2)
        correct += int(((x[test] @ w + b > 0).astype(np.int64) == y[test]).sum())
    return correct / n


def polarity_accuracy(model: Any, tokenizer: Any, folds: int = 10, seed: int = 0) -> float:
    """Stratified 10-fold CV accuracy of logistic regression (L2, C = 1) on the 200 polarity sentence embeddings.

    200 sentences: one sentence is 0.005; dense MiniLM-L6 gives 0.735 at seed 0, mean 0.735 +- 0.009
    (SD) over seeds 0-9: the fold assignment alone moves it by about a point.
    """
    from .data import polarity

    sents, labels = polarity()
    emb = sentence_embeddings(model, tokenizer, sents).double().numpy()
    return cv_accuracy(emb, labels, folds=folds, seed=seed)


def word_pairs_spearman(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str, float]]) -> float:
    """Spearman between cosine(embed(w1), embed(w2)) -- each word encoded as a one-word sentence -- and the human
    scores."""
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    emb = sentence_embeddings(model, tokenizer, words)
    index = {w: i for i, w in enumerate(words)}
    cos = [float(emb[index[a]] @ emb[index[b]]) for a, b, _ in pairs]
    return spearman(cos, [s for _, _, s in pairs])


def wordsim353_spearman(model: Any, tokenizer: Any) -> float:
    """WordSim353 Spearman (353 pairs)."""
    from .data import wordsim353

    return word_pairs_spearman(model, tokenizer, wordsim353())


def simlex999_spearman(model: Any, tokenizer: Any) -> float:
    """SimLex-999 Spearman (999 pairs)."""
    from .data import simlex999

    return word_pairs_spearman(model, tokenizer, simlex999())


def encoder_scores(model: Any, tokenizer: Any) -> dict[str, float]:
    """``{"lee50_spearman", "polarity_accuracy", "wordsim353_spearman", "simlex999_spearman"}``."""
    return {"lee50_spearman": lee50_spearman(model, tokenizer),
            "polarity_accuracy": polarity_accuracy(model, tokenizer),
            "wordsim353_spearman": wordsim353_spearman(model, tokenizer),
            "simlex999_spearman": simlex999_spearman(model, tokenizer)}
