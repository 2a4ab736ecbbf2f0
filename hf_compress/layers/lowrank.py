"""Low-rank linear layer: ``W ≈ U Vᵀ`` stored as two plain ``nn.Linear``s (PEFT/Trainer work unchanged)."""

from __future__ import annotations

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
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Build from ``up [out, r]``, ``down [r, in]`` and ``bias [out]``."""
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Module, rank: int) -> "LowRankLinear":
        """Truncated SVD (in float64) of an ``nn.Linear``/``Conv1D``: ``W = U S Vᵀ``, ``up = U_r √S_r``, ``down = √S_r V_rᵀ``."""
        weight, bias = linear_weight_and_bias(linear, "LowRankLinear.from_dense")
        check_rank(rank, min(weight.shape), f"LowRankLinear.from_dense({weight.shape[1]}->{weight.shape[0]})")
        u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
        root = s[:rank].sqrt()
        up = (u[:, :rank] * root).to(weight.dtype)
        down = (root[:, None] * vh[:rank]).to(weight.dtype)
        return cls.from_factors(up, down, None if bias is None else bias.detach())

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.layer_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.up.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "LowRankLinear":
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
