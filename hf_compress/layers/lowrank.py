"""Low-rank linear layer: ``W ≈ U Vᵀ`` stored as two plain ``nn.Linear``s (PEFT/Trainer work unchanged).

:func:`spectrum` factors a weight plainly (SVD), in the whitened basis of its input covariance (SVD-LLM) or with
ASVD-style column scaling; :class:`Spectrum` then truncates it to any rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..registry import register_layer
from .common import check_rank, linear_weight_and_bias


@register_layer
class LowRankLinear(nn.Module):
    """``y = up(down(x))`` with ``down: in_features -> rank`` (no bias) and ``up: rank -> out_features`` (bias).

    Shapes: ``down.weight [rank, in_features]``, ``up.weight [out_features, rank]``, ``up.bias [out_features]``.
    """

    layer_type = "low_rank_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, min(in_features, out_features), f"LowRankLinear({in_features}->{out_features})")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` product (materialized on access; for inspection only)."""
        return self.up.weight @ self.down.weight

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        """Build from ``up [out, r]``, ``down [r, in]`` and ``bias [out]``."""
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0] or (
                bias is not None and tuple(bias.shape) != (up.shape[0],)):
            raise ValueError(f"hf_compress: LowRankLinear.from_factors needs up [out, r], down [r, in] and bias [out]; "
                             f"got up {list(up.shape)}, down {list(down.shape)}, bias "
                             f"{None if bias is None else list(bias.shape)}.")
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Module, rank: int) -> LowRankLinear:
        """Truncated SVD (float64) of an ``nn.Linear``/``Conv1D``: ``W = U S Vᵀ``, ``up = U_r √S_r``,
        ``down = √S_r V_rᵀ``."""
        weight, bias = linear_weight_and_bias(linear, "LowRankLinear.from_dense")
        check_rank(rank, min(weight.shape), f"LowRankLinear.from_dense({weight.shape[1]}->{weight.shape[0]})")
        return cls.from_spectrum(spectrum(weight), rank, bias, weight.dtype)

    @classmethod
    def from_spectrum(cls, spec: Spectrum, rank: int, bias: torch.Tensor | None, dtype: torch.dtype) -> LowRankLinear:
        """Rank-``rank`` truncation of a :class:`Spectrum` (``bias [out]`` copied onto ``up``)."""
        check_rank(rank, spec.s.numel(), f"LowRankLinear({spec.vt.shape[1]}->{spec.u.shape[0]})")
        up, down = spec.factors(rank)
        return cls.from_factors(up.to(dtype), down.to(dtype), None if bias is None else bias.detach())

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.layer_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.up.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankLinear:
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class Spectrum:
    """``W ≈ u · diag(s) · vt`` (exact at full rank): ``u [out, k]``, ``s [k]`` descending, ``vt [k, in]``.

    For whitened/scaled factorizations ``vt`` already includes the inverse transform (``Vᵀ S⁻¹``), and ``s`` are
    the singular values of the transformed weight ``W·S``, so truncating them is optimal for that transform.
    """

    u: torch.Tensor
    s: torch.Tensor
    vt: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [out, r] = U_r Σ_r^½, down [r, in] = Σ_r^½ V_rᵀ S⁻¹)``."""
        root = self.s[:rank].clamp_min(0).sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.vt[:rank]

    def rank_for_energy(self, energy: float) -> int:
        """Smallest rank whose ``Σ s²`` share is at least ``energy``."""
        share = (self.s.double() ** 2).cumsum(0) / (self.s.double() ** 2).sum().clamp_min(1e-300)
        return min(int((share < energy - 1e-12).sum()) + 1, self.s.numel())

    def truncate(self, rank: int) -> Spectrum:
        return Spectrum(self.u[:, :rank].clone(), self.s[:rank].clone(), self.vt[:rank].clone())


def whitening(cov: torch.Tensor, damping: float = 0.0, who: str = "module") -> torch.Tensor:
    """Lower Cholesky factor ``S [in, in]`` (float64) of ``cov + λ·mean(diag)·I``; ``λ = damping``, raised ×10
    from 1e-8 up to 1 while the covariance is not positive definite (dead or collinear input channels)."""
    cov = cov.to(torch.float64)
    scale = cov.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    lam = float(damping)
    while True:
        chol, info = torch.linalg.cholesky_ex(cov + lam * scale * eye)
        if int(info) == 0:
            return chol
        if lam >= 1.0:
            raise ValueError(f"hf_compress: {who}: input covariance is not positive definite even with damping 1.0; "
                             "check the calibration batches (NaN/inf activations?).")
        lam = max(lam * 10, 1e-8)


def spectrum(weight: torch.Tensor, cov: torch.Tensor | None = None, abs_mean: torch.Tensor | None = None,
             alpha: float = 0.5, damping: float = 0.0, who: str = "module") -> Spectrum:
    """Factor ``weight [out, in]`` in float64: plain SVD; with ``cov [in, in]`` (``XᵀX/N``) the SVD of ``W·S``
    where ``S Sᵀ = cov`` (SVD-LLM truncation-aware whitening); with ``abs_mean [in]`` the SVD of
    ``W·diag(abs_mean^alpha)`` (ASVD)."""
    w = weight.detach().to(torch.float64)
    if cov is not None:
        chol = whitening(cov.to(w.device), damping, who)
        u, s, vt = torch.linalg.svd(w @ chol, full_matrices=False)
        vt = torch.linalg.solve_triangular(chol, vt, upper=False, left=False)  # Vᵀ S⁻¹
    elif abs_mean is not None:
        scale = abs_mean.to(w.device, torch.float64).clamp_min(1e-8 * float(abs_mean.max().clamp_min(1e-30))) ** alpha
        u, s, vt = torch.linalg.svd(w * scale, full_matrices=False)
        vt = vt / scale
    else:
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
    return Spectrum(u, s, vt)
