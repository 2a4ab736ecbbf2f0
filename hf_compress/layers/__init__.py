"""Compressed ``nn.Module``s. Each has ``from_dense(...)``, keeps the dense layer's shape attributes, and
can be rebuilt empty from its JSON ``spec()`` when a checkpoint is loaded."""

from .common import linear_weight_and_bias
from .lowrank import LowRankLinear

__all__ = ["LowRankLinear", "linear_weight_and_bias"]
