"""Calibration passes: run real text through a model and collect per-module input statistics with hooks.

``batches`` are model inputs: ``LongTensor [batch, seq]`` token ids, or dicts of keyword inputs
(e.g. ``{"input_features": ..., "decoder_input_ids": ...}`` for Whisper).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


def run_batches(model: nn.Module, batches: Iterable[Any], desc: str = "calibration") -> None:
    """Forward every batch through ``model`` (no grad, eval mode restored afterwards)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(list(batches), desc=desc, leave=False):
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
    model.train(was_training)


@contextmanager
def input_hooks(model: nn.Module, names: Iterable[str], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, call ``fn(name, x)`` with each named module's first input ``x [..., in_features]``."""
    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda _m, args, _n=name: fn(_n, args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_covariances(model: nn.Module, names: Iterable[str], batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Per module: ``XᵀX`` summed over all calibration tokens (float64 ``[in, in]``) divided by the token count."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    names = list(names)
    with input_hooks(model, names, add):
        run_batches(model, batches)
    return {n: sums[n] / counts[n] for n in sums}


def input_samples(
    model: nn.Module, names: Iterable[str], batches: Iterable[Any], max_rows: int = 4096, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Per module: up to ``max_rows`` input rows ``[rows, in]`` sampled uniformly from the calibration tokens."""
    rows: dict[str, list[torch.Tensor]] = {}
    g = torch.Generator().manual_seed(seed)

    def add(name: str, x: torch.Tensor) -> None:
        rows.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).float().cpu())

    names = list(names)
    with input_hooks(model, names, add):
        run_batches(model, batches)
    out = {}
    for name, parts in rows.items():
        x = torch.cat(parts)
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=g)[:max_rows]]
        out[name] = x
    return out
