"""Low-rank decomposition of linear layers without retraining (truncated SVD)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from torch import nn

from ..compress import CompressionContext
from ..config import MethodConfig
from ..layers.common import linear_weight_and_bias
from ..layers.lowrank import LowRankLinear
from ..registry import register_method

_METHODS = ("svd",)


@dataclass
class LowRankConfig(MethodConfig):
    """Replace ``nn.Linear``/``Conv1D`` weights ``W [out, in]`` by a rank-``r`` product.

    Give exactly one of ``rank`` (absolute) or ``rank_ratio`` (fraction of the layer's parameters kept:
    ``r = floor(rank_ratio · out·in / (out + in))``). Layers where the factors would not be smaller than
    the dense weight are left dense, with a warning.
    """

    registry_name = "low_rank"

    rank: int | None = field(default=None, metadata={"help": "absolute rank r >= 1"})
    rank_ratio: float | None = field(default=None, metadata={"help": "fraction of parameters kept, in (0, 1]"})
    method: str = field(default="svd", metadata={"help": f"decomposition, one of {_METHODS}"})

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.rank_ratio is None):
            raise ValueError("hf_compress: LowRankConfig needs exactly one of `rank` or `rank_ratio`.")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"hf_compress: LowRankConfig.rank must be a positive int, got {self.rank!r}.")
        if self.rank_ratio is not None and not 0.0 < float(self.rank_ratio) <= 1.0:
            raise ValueError(f"hf_compress: LowRankConfig.rank_ratio must be in (0, 1], got {self.rank_ratio!r}.")
        if self.method not in _METHODS:
            raise ValueError(f"hf_compress: LowRankConfig.method must be one of {_METHODS}, got {self.method!r}.")

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The rank this config gives a ``[out_features, in_features]`` weight."""
        if self.rank is not None:
            return self.rank
        return max(1, math.floor(self.rank_ratio * out_features * in_features / (out_features + in_features)))


def compress_low_rank(module: nn.Module, config: LowRankConfig, ctx: CompressionContext) -> nn.Module | None:
    weight, _ = linear_weight_and_bias(module, ctx.name)
    out_features, in_features = weight.shape
    rank = config.rank_for(out_features, in_features)
    if rank * (out_features + in_features) >= out_features * in_features:
        if rank > min(out_features, in_features):
            raise ValueError(
                f"hf_compress: {ctx.name}: rank {rank} exceeds min(in_features, out_features) = "
                f"{min(out_features, in_features)}. Use a rank <= {min(out_features, in_features)}."
            )
        warnings.warn(
            f"hf_compress: {ctx.name}: rank {rank} factors ({rank * (out_features + in_features)} params) are not "
            f"smaller than the dense weight ({out_features * in_features}); left dense.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return LowRankLinear.from_dense(module, rank)


register_method("low_rank", LowRankConfig, compress_low_rank)
