"""JLCM step 3 (see :mod:`hf_compress.methods.jlcm`): the joint codebook + proximal mapping (+ blockwise affine)
optimization of the layer's output reconstruction error ``tr(E Σ Eᵀ)``, and the loss helpers."""

from __future__ import annotations

import torch

from .codebook_fit import gather_rows, nearest, refit_affine


def joint_optimize(w: torch.Tensor, sigma: torch.Tensor, centers: torch.Tensor, codes: torch.Tensor,
                   s_map: torch.Tensor, o_map: torch.Tensor, row_book: torch.Tensor, steps: int, update: str,
                   block: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Joint codebook + proximal mapping (+ blockwise affine) optimization of ``tr(E Σ Eᵀ)`` (module docstring,
    step 3). ``s_map, o_map [out, n_vec]``: scale and offset of every weight vector. Returns the new centers, codes,
    ``s_map``, ``o_map`` and statistics."""
    out, inn = w.shape
    books, k, d = centers.shape
    h = torch.diagonal(sigma).reshape(1, inn // d, d)  # [1, n_vec, d]
    s3, o3 = s_map[:, :, None], o_map[:, :, None]

    def decode(c: torch.Tensor, i: torch.Tensor, offset: bool = True) -> torch.Tensor:
        vals = c[row_book[:, None], i] * s3
        return (vals + o3 if offset else vals).reshape(out, inn)

    def loss(w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        es = (w_hat - w) @ sigma
        return ((w_hat - w) * es).sum(), es

    norm = float((w * (w @ sigma)).sum()).__abs__() or 1.0
    w_hat = decode(centers, codes)
    cur, es = loss(w_hat)
    start, frac, accepted, history = float(cur) / norm, 0.25, 0, []
    for _ in range(steps):
        history.append(round(float(cur) / norm, 6))
        # codebook step: diagonally preconditioned gradient + exact line search
        flat = (row_book[:, None] * k + codes).reshape(-1)
        grad = torch.zeros(books * k, d).index_add_(0, flat, (2 * es.view(out, -1, d) * s3).reshape(-1, d))
        curv = torch.zeros(books * k, d).index_add_(0, flat, (2 * s3 ** 2 * h).expand(out, -1, d).reshape(-1, d))
        direction = (grad / curv.clamp_min(1e-30)).view(books, k, d)
        dw = decode(direction, codes, offset=False)
        dws = dw @ sigma
        num, den = (es * dw).sum(), (dw * dws).sum()
        if den > 0:
            alpha = num / den
            centers, w_hat, es = centers - alpha * direction, w_hat - alpha * dw, es - alpha * dws
            cur = cur - num * alpha
        if block:  # affine step: per-block diag(Σ)-weighted least squares of (scale, offset), kept if L drops
            cand_s, cand_o = refit_affine(w, centers[row_book[:, None], codes], h, block, s3[:, :, 0])
            s_new, o_new = cand_s[:, :, None], cand_o[:, :, None]
            cand = ((centers[row_book[:, None], codes] * s_new) + o_new).reshape(out, inn)
            new, new_es = loss(cand)
            if new < cur:
                s3, o3, w_hat, es, cur = s_new, o_new, cand, new_es, new
        # mapping step: proximal proposal, then keep the `frac` most promising moves (adaptive)
        grad_w = 2 * es.view(out, -1, d)
        row_centers = centers[row_book]  # [out, k, d]
        cur_vals = (w_hat.view(out, -1, d) - o3) / s3
        if update == "proximal":
            new_codes = nearest(cur_vals - grad_w / (2 * s3 * h), row_centers, h)
        else:  # straight-through gradient of the one-hot mapping: argmin_k s<g, C_k>
            new_codes = (grad_w @ row_centers.transpose(1, 2)).argmin(-1)
        delta = gather_rows(row_centers, new_codes) - cur_vals  # [out, n_vec, d]
        gain = (s3 * grad_w * delta).sum(-1)  # first-order predicted change (all STE knows)
        if update == "proximal":  # + the proximity term: the exact single-move change of L
            gain = gain + (s3 ** 2 * h * delta ** 2).sum(-1)
        moves = (new_codes != codes) & (gain < 0)
        n_moves = int(moves.sum())
        if n_moves == 0:
            continue
        keep = max(1, int(frac * n_moves))
        if keep < n_moves:
            thresh = torch.kthvalue(gain[moves], keep).values
            moves &= gain <= thresh
        cand_codes = torch.where(moves, new_codes, codes)
        cand = decode(centers, cand_codes)
        new, new_es = loss(cand)
        if new < cur:
            codes, w_hat, es, cur, accepted = cand_codes, cand, new_es, new, accepted + 1
            frac = min(1.0, frac * 2)
        else:
            frac /= 4
    return centers, codes, s3[:, :, 0], o3[:, :, 0], {"loss_init": start, "loss_final": float(cur) / norm,
                                                      "accepted": accepted, "history": history}


def decode_weights(centers: torch.Tensor, codes: torch.Tensor, s_map: torch.Tensor, o_map: torch.Tensor,
            row_book: torch.Tensor) -> torch.Tensor:
    """``Ŵ [out, in]`` (sorted rows) from ``centers [books, K, d]``, ``codes [out, n_vec]``, ``s_map, o_map
    [out, n_vec]``."""
    vals = centers[row_book[:, None], codes] * s_map[:, :, None] + o_map[:, :, None]
    return vals.reshape(codes.shape[0], -1)


def output_loss(w: torch.Tensor, sigma: torch.Tensor, centers: torch.Tensor, codes: torch.Tensor,
                 s_map: torch.Tensor, o_map: torch.Tensor, row_book: torch.Tensor) -> float:
    """``tr(E Σ Eᵀ)`` for ``E = Ŵ − W``."""
    e = decode_weights(centers, codes, s_map, o_map, row_book) - w
    return float((e * (e @ sigma)).sum())
