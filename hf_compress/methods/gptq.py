r"""Error-feedback assignment of weights to codewords (GPTQ / OBQ, Frantar et al. 2023; vector form as in GPTVQ).

Used by JLCM (:mod:`hf_compress.methods.jlcm`) as its strongest mapping initialization. For ``W [out, in]`` and the
(damped) input second moments ``Σ = XᵀX/n [in, in]``, the columns are assigned left to right: column ``j`` (a group
of ``d`` columns for vector codebooks) goes to its nearest codeword, and its error is spread over the columns not
yet assigned so that the layer output ``XWᵀ`` changes least:

.. math:: W_{:, j+1:} \mathrel{-}= \frac{W_{:,j} - Q_{:,j}}{U_{jj}}\, U_{j, j+1:},
          \qquad U = \mathrm{chol}(\Sigma^{-1})^\top

(lazy batches of columns, the error applied to later batches in one matrix product). With blocks (``block > 0``),
each (row, block) affine map ``Ŵ = s·C[I] + o`` is fitted to the block's *updated* weights when the block starts,
as GPTQ does for its groups. The codebooks themselves are inputs and are not changed here.
"""

from __future__ import annotations

import torch

from ..layers.lowrank import whitening


def _inverse_cholesky(sigma: torch.Tensor, who: str) -> torch.Tensor:
    """Upper ``U`` with ``UᵀU = Σ⁻¹`` (``Σ [in, in]``; damping raised by :func:`whitening` until it factorizes)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(whitening(sigma, who=who)), upper=True)


def gptq_codes(w: torch.Tensor, sigma: torch.Tensor, row_centers: torch.Tensor, s_map: torch.Tensor,
               o_map: torch.Tensor, block: int = 0, who: str = "layer"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes for ``w [out, in]`` by error feedback.

    ``row_centers [out, K, d]``: every row's codebook (normalized space); ``s_map, o_map [out, in/d]``: scale and
    offset of every weight vector (refitted per block when ``block`` > 0). Returns ``codes [out, in/d]`` and the
    (possibly refitted) ``s_map, o_map``.
    """
    out, inn = w.shape
    d = row_centers.shape[-1]
    u = _inverse_cholesky(sigma, who).float()
    work = w.detach().float().clone()
    codes = torch.empty(out, inn // d, dtype=torch.long)
    s_map, o_map = s_map.clone(), o_map.clone()
    lazy = block if block else max(d, 128 - 128 % d)
    scalar = d == 1
    if scalar:  # sort each row's codebook once: nearest = binary search on the midpoints
        sorted_c, order = row_centers[..., 0].sort(-1)
        mids = ((sorted_c[:, 1:] + sorted_c[:, :-1]) / 2).contiguous()
    rows = torch.arange(out)
    for i1 in range(0, inn, lazy):
        i2 = min(i1 + lazy, inn)
        cols = work[:, i1:i2]
        errs = torch.zeros_like(cols)
        if block:  # this block's affine map from its updated weights (fp16, as stored)
            lo = cols.amin(1).half().float()
            scale = (cols.amax(1) - lo).clamp_min(1e-6).half().float()
            s_map[:, i1 // d:i2 // d], o_map[:, i1 // d:i2 // d] = scale[:, None], lo[:, None]
        for j in range(0, i2 - i1, d):
            v = (i1 + j) // d
            s, o = s_map[:, v:v + 1], o_map[:, v:v + 1]
            pts = (cols[:, j:j + d] - o) / s  # [out, d]
            if scalar:
                code = torch.gather(order, 1, torch.searchsorted(mids, pts.contiguous()))[:, 0]
            else:
                code = (pts[:, None, :] - row_centers).square().sum(-1).argmin(-1)
            codes[:, v] = code
            q = row_centers[rows, code] * s + o  # [out, d]
            for c in range(d):
                jc = j + c
                err = (cols[:, jc] - q[:, c]) / u[i1 + jc, i1 + jc]
                cols[:, jc + 1:] -= err[:, None] * u[i1 + jc, i1 + jc + 1:i2][None]
                errs[:, jc] = err
        work[:, i2:] -= errs @ u[i1:i2, i2:]
    return codes, s_map, o_map
