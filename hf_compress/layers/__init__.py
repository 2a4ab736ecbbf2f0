"""Compressed ``nn.Module``s. Each is built by its method (some through a ``from_dense`` / ``from_codes`` /
``from_factors`` constructor), keeps the dense layer's shape attributes, and can be rebuilt empty from its JSON
``spec()`` when a checkpoint is loaded."""

from .common import linear_weight_and_bias
from .lowrank import LowRankLinear

__all__ = ["LowRankLinear", "linear_weight_and_bias"]
