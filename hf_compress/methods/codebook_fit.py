"""Building codebooks for :class:`~hf_compress.layers.codebook.CodebookLinear` (used by
:mod:`hf_compress.methods.jlcm`): nearest codewords, uniform (RTN) and k-means codebooks, row grouping by weight
distribution, per-block affine refits and memoized builds."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from ..layers.codebook import group_sizes


def nearest(points: torch.Tensor, centers: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """``argmin_k Σ_c h_c (points − centers_k)_c²`` for ``points [R, N, d]``, ``centers [R, K, d]`` → ``[R, N]``
    (``h`` broadcastable to ``[R, N, d]``)."""
    r, n, d = points.shape
    if d == 1:  # scalar: the weighting does not change the nearest codeword; binary search on midpoints
        sorted_c, order = centers[..., 0].sort(-1)
        mids = (sorted_c[:, 1:] + sorted_c[:, :-1]) / 2
        return torch.gather(order, 1, torch.searchsorted(mids.contiguous(), points[..., 0].contiguous()))
    out = torch.empty(r, n, dtype=torch.long)
    step = max(1, (1 << 23) // max(1, n * centers.shape[1] * d))
    for i in range(0, r, step):
        diff = points[i:i + step, :, None, :] - centers[i:i + step, None, :, :]  # [r, n, K, d]
        hh = None if h is None else (h[i:i + step] if h.shape[0] == r else h).expand(diff.shape[0], n, d)
        diff = diff.square_() if hh is None else diff.square_().mul_(hh[:, :, None, :])
        out[i:i + step] = diff.sum(-1).argmin(-1)
    return out


def rtn_codebooks(points: torch.Tensor, row_book: torch.Tensor, books: int, k: int) -> torch.Tensor:
    """Uniform product grid per codebook over its min..max per coordinate: ``[books, k, d]``."""
    d = points.shape[-1]
    flat = points.reshape(points.shape[0], -1, d)
    lo = torch.full((books, d), float("inf")).scatter_reduce(0, row_book[:, None].expand(-1, d), flat.amin(1), "amin")
    hi = torch.full((books, d), -float("inf")).scatter_reduce(0, row_book[:, None].expand(-1, d), flat.amax(1), "amax")
    levels = [max(1, round(k ** (1 / d)))] * d
    if 1 << int(math.log2(k)) == k:  # split the bits as evenly as possible over the coordinates
        b = int(math.log2(k))
        levels = [1 << (b // d + (c < b % d)) for c in range(d)]
    axes = [torch.linspace(0, 1, n) if n > 1 else torch.tensor([0.5]) for n in levels]
    grid = torch.cartesian_prod(*axes).reshape(-1, d)  # [prod(levels), d]
    if grid.shape[0] < k:
        grid = torch.cat([grid, grid[:1].expand(k - grid.shape[0], d)])
    return lo[:, None, :] + grid[None] * (hi - lo)[:, None, :]


def kmeans_codebooks(points: torch.Tensor, row_book: torch.Tensor, books: int, k: int, iters: int,
                      seed: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """Lloyd k-means of each codebook's vectors (``points [out, n_vec, d]``): ``[books, k, d]``.

    Initialized at the round-to-nearest grid (:func:`rtn_codebooks`), so the (``h``-weighted) squared error never
    exceeds round-to-nearest's: both Lloyd steps are monotone from there. ``h`` (optional, broadcastable to
    ``[out, n_vec, d]``, e.g. ``diag Σ`` per coordinate or a block scale² per vector) weights distances and
    means. ``seed`` is kept for API stability (the init is deterministic)."""
    d = points.shape[-1]
    centers = rtn_codebooks(points, row_book, books, k)
    for _ in range(iters):
        codes = nearest(points, centers[row_book], h)
        flat = (row_book[:, None] * k + codes).reshape(-1)
        hw = torch.ones_like(points) if h is None else h.expand_as(points).float()
        sums = torch.zeros(books * k, d).index_add_(0, flat, (hw * points).reshape(-1, d))
        counts = torch.zeros(books * k, d).index_add_(0, flat, hw.reshape(-1, d))
        # (counts are summed weights: with h = scale² ~1e-2 they sit far below 1, so only guard the empty clusters)
        safe = counts.clamp_min(torch.finfo(counts.dtype).tiny)
        centers = torch.where(counts > 0, sums / safe, centers.reshape(-1, d)).view(books, k, d)
    return centers


_QUANTILES = torch.tensor([0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98])


_ROW_CHUNK = 4096  # rows of the [rows, groups] distances reduced at a time (no masked copy of the whole matrix)
_REFINE_LIMIT = 1 << 31  # rows × groups above which the balanced k-means is skipped (its distances: 8 GiB fp32)


def _balanced_assign(dist: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Rows ``[n]`` → groups, each row as close as possible to its center, group g taking exactly ``caps[g]``
    (``dist [n, groups]``, read a chunk of rows at a time)."""
    labels = torch.full((dist.shape[0],), -1, dtype=torch.long)
    caps = caps.clone()
    while (labels < 0).any():
        un = (labels < 0).nonzero().squeeze(1)
        closed = (caps == 0)[None, :]
        best, choice = torch.empty(un.numel(), dtype=dist.dtype), torch.empty(un.numel(), dtype=torch.long)
        for s in range(0, un.numel(), _ROW_CHUNK):
            best[s:s + _ROW_CHUNK], choice[s:s + _ROW_CHUNK] = dist[un[s:s + _ROW_CHUNK]].masked_fill(
                closed, float("inf")).min(1)
        order = torch.argsort(best, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        ch = choice[order]
        counts = torch.bincount(ch, minlength=caps.numel())
        start = torch.cumsum(counts, 0) - counts
        accept = torch.arange(ch.numel()) - start[ch] < caps[ch]
        labels[un[order[accept]]] = ch[accept]
        caps -= torch.bincount(ch[accept], minlength=caps.numel())
    return labels


def similar_row_groups(weight: torch.Tensor, n_groups: int, iters: int = 8) -> torch.Tensor:
    """``perm [out]``: rows in ``n_groups`` contiguous balanced groups (balanced k-means on row quantiles, started
    from chunks along the features' leading principal direction). When ``out × n_groups`` exceeds 2³¹ (a tall
    table in many small groups, e.g. Gemma-3's 262k-token table at the default group size), the k-means is skipped
    and those chunks are the groups: its ``[out, n_groups]`` distances would not fit in memory."""
    feats = torch.quantile(weight.float(), _QUANTILES.to(weight.device), dim=1).T  # [out, 7]
    feats = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-12)
    caps = group_sizes(weight.shape[0], n_groups)
    # init: chunks along the leading principal direction
    first = torch.linalg.svd(feats, full_matrices=False)[2][0]
    labels = torch.repeat_interleave(torch.arange(n_groups), caps)[torch.argsort(torch.argsort(feats @ first))]
    for _ in range(iters if weight.shape[0] * n_groups <= _REFINE_LIMIT else 0):
        centers = torch.zeros(n_groups, feats.shape[1]).index_add_(0, labels, feats) / caps[:, None]
        new = _balanced_assign(torch.cdist(feats, centers), caps)
        if torch.equal(new, labels):
            break
        labels = new
    return torch.argsort(labels, stable=True)


def refit_affine(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, block: int,
                  s_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, block) ``argmin_{s,o} Σ_j h_j (s q_j + o − w_j)²`` for ``w [out, in]``, codeword values
    ``q [out, n_vec, d]``, weights ``h [1, n_vec, d]``; returned fp16-rounded and expanded to ``[out, n_vec]``.
    Blocks whose fit is degenerate or not positive keep their scale ``s_old [out, n_vec]`` (offset refit)."""
    out = w.shape[0]
    d = q.shape[-1]
    qb, wb = q.reshape(out, -1, block), w.reshape(out, -1, block)
    hb = h.reshape(1, -1, block).expand_as(qb)
    sh, sq, sw = hb.sum(-1), (hb * qb).sum(-1), (hb * wb).sum(-1)
    sqq, sqw = (hb * qb * qb).sum(-1), (hb * qb * wb).sum(-1)
    det = sh * sqq - sq * sq
    ok = det > 1e-12 * sh * sqq.clamp_min(1e-30)
    d_ = q.shape[-1]
    s = (sh * sqw - sq * sw) / det.where(ok, torch.ones_like(det))
    s = torch.where(ok & (s > 1e-6), s, s_old[:, :: block // d_])
    o = (sw - s * sq) / sh.clamp_min(1e-30)
    s, o = s.half().float(), o.half().float()
    rep_ = block // d
    return s.repeat_interleave(rep_, 1), o.repeat_interleave(rep_, 1)


def gather_rows(row_centers: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``row_centers [R, K, d]`` indexed by ``codes [R, N]`` → ``[R, N, d]``."""
    return torch.gather(row_centers, 1, codes[:, :, None].expand(-1, -1, row_centers.shape[-1]))


_CACHE: dict[tuple, torch.Tensor] = {}


def memoized(key: tuple, tensors: tuple[torch.Tensor, ...], build: Any) -> torch.Tensor:
    """Memoize a deterministic ``build()`` on ``key`` + the exact bytes of ``tensors`` (sweeps redo the same
    grouping / k-means for every method at a given layout); at most 512 entries."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:  # shape and dtype too: equal bytes may be different tensors (e.g. all zeros)
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    full = (*key, digest.hexdigest())
    if full not in _CACHE:
        if len(_CACHE) >= 512:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[full] = build()
    return _CACHE[full].clone().to(tensors[0].device)  # the key ignores the device


def group_rows(weight: torch.Tensor, n_groups: int, iters: int = 8) -> torch.Tensor:
    """``perm [out]``: rows reordered into ``n_groups`` contiguous balanced groups of similar weight distribution."""
    out = weight.shape[0]
    if n_groups == 1:
        return torch.arange(out)
    return memoized(("group", n_groups, iters), (weight,), lambda: similar_row_groups(weight, n_groups, iters))
