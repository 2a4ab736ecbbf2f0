"""Helpers shared by compressed layers."""

from __future__ import annotations

import torch
from torch import nn


def linear_weight_and_bias(module: nn.Module, who: str = "module") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight as ``[out_features, in_features]`` and bias ``[out_features]`` of an ``nn.Linear`` or GPT-2 ``Conv1D``.

    Raises a ``TypeError`` naming ``who`` for anything else.
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D: [in, out]
        return module.weight.t(), module.bias
    raise TypeError(
        f"hf_compress: {who} is a {type(module).__name__}; this method compresses nn.Linear or GPT-2 Conv1D "
        "layers only. Point the pattern at linear layers."
    )


def check_rank(rank: int, limit: int, who: str, what: str = "min(in_features, out_features)") -> None:
    """Raise a clear ``ValueError`` unless ``1 <= rank <= limit``."""
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"hf_compress: {who}: rank must be an int, got {rank!r}.")
    if rank < 1:
        raise ValueError(f"hf_compress: {who}: rank must be >= 1, got {rank}. Use a positive rank or rank_ratio.")
    if rank > limit:
        raise ValueError(
            f"hf_compress: {who}: rank {rank} exceeds {what} = {limit}. Use a rank <= {limit}."
        )


def reusable(cached: torch.Tensor) -> bool:
    """Whether a cached tensor may be used now: one built under ``torch.inference_mode()`` (calibration, a sweep's
    evaluation) cannot enter autograd outside it ("Inference tensors cannot be saved for backward"): rebuild it."""
    return torch.is_inference_mode_enabled() or not cached.is_inference()


def content_key(t: torch.Tensor) -> tuple[int, int]:
    """Identity of a tensor's current contents: (storage pointer, in-place version counter); a cache keyed on it is
    invalidated by in-place writes and by replacing the tensor."""
    try:
        return (t.data_ptr(), t._version)
    except RuntimeError:  # inference tensors have no version counter
        return (t.data_ptr(), -1)
