"""Calibration passes: run real text through a model and collect per-module input statistics with hooks.

``batches`` are model inputs: ``LongTensor [batch, seq]`` token ids, or dicts of keyword inputs
(e.g. ``{"input_features": ..., "decoder_input_ids": ...}`` for Whisper).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


class _StopForward(Exception):
    """Raised inside a truncated calibration pass once every hooked module has run (see :func:`truncated_passes`)."""


_truncate = False  # set by truncated_passes()


@contextmanager
def truncated_passes() -> Iterator[None]:
    """While active, every calibration pass (:func:`input_hooks`) stops as soon as each module it hooks has run once,
    so the rest of the model is skipped: statistics of block ``i`` cost the blocks up to ``i`` only."""
    global _truncate
    previous, _truncate = _truncate, True
    try:
        yield
    finally:
        _truncate = previous


@contextmanager
def restored_training_state(module: nn.Module, flags: bool = True) -> Iterator[None]:
    """On leaving (normally or by an exception) ``module`` gets back its train/eval mode and, with ``flags``, every
    parameter's ``requires_grad``."""
    was_training = module.training
    saved = {p: p.requires_grad for p in module.parameters()} if flags else {}
    try:
        yield
    finally:
        module.train(was_training)
        for p, flag in saved.items():
            p.requires_grad_(flag)


def keeps_training_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``fn(model, ...)``: the model's train/eval mode is restored when ``fn`` returns or raises."""
    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with restored_training_state(model, flags=False):
            return fn(model, *args, **kwargs)
    return wrapper


def as_batches(calibration: Any, vocab_size: int | None = None) -> list[Any] | None:
    """Calibration data as a list of batches: ``LongTensor [batch, seq]`` (a 1-D row gains the batch axis) or plain
    dicts of model inputs (``BatchEncoding`` included). A lone tensor or mapping is one batch. Token ids (a bare
    tensor, ``input_ids``, ``decoder_input_ids``) must be non-empty integer ``[batch, seq]`` tensors in
    ``[0, vocab_size)``; dict values must be tensors."""
    if calibration is None:
        return None
    items = [calibration] if isinstance(calibration, (torch.Tensor, Mapping)) else list(calibration)
    out: list[Any] = []
    for i, b in enumerate(items):
        if isinstance(b, Mapping):
            out.append(dict(b))
            for key, value in b.items():  # (other values, e.g. use_cache=False, pass through to the model)
                if isinstance(value, (list, tuple)) and key in _TENSOR_INPUTS:
                    raise TypeError(f"hf_compress: calibration batch {i}[{key!r}] is a {type(value).__name__}, not a "
                                    "tensor; tokenize with return_tensors='pt'.")
                if key in ("input_ids", "decoder_input_ids") and isinstance(value, torch.Tensor):
                    _check_ids(value, f"calibration batch {i}[{key!r}]", vocab_size)
        elif isinstance(b, torch.Tensor):
            out.append(b[None] if b.ndim == 1 else b)
            _check_ids(out[-1], f"calibration batch {i}", vocab_size)
        else:
            raise TypeError(f"hf_compress: calibration batch {i} is a {type(b).__name__}; give LongTensor [batch, seq] "
                            "batches of token ids, or dicts of model inputs (e.g. a tokenizer's output).")
    return out


_TENSOR_INPUTS = ("input_ids", "decoder_input_ids", "attention_mask", "decoder_attention_mask", "input_features",
                  "token_type_ids", "position_ids")


def _check_ids(ids: torch.Tensor, what: str, vocab_size: int | None) -> None:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim != 2 or not ids.numel():
        raise ValueError(f"hf_compress: {what} must be a non-empty integer [batch, seq] tensor of token ids, got "
                         f"{ids.dtype} of shape {list(ids.shape)} (speech models take dicts of input_features).")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ValueError(f"hf_compress: {what} holds token ids in [{low}, {high}], outside the model's vocabulary "
                         f"[0, {vocab_size}); use the model's own tokenizer.")


_MASKS: list[torch.Tensor] = []  # the running batch's token masks ``[batch, seq]`` (see :func:`token_rows`)


def _forward(model: nn.Module, batch: Any) -> None:
    """One calibration forward; a pass cut short by :func:`truncated_passes` ends here. While it runs, the batch's
    ``attention_mask`` / ``decoder_attention_mask`` are what :func:`token_rows` filters hooked inputs with."""
    _MASKS[:] = [m for k in ("attention_mask", "decoder_attention_mask")
                 if isinstance(batch, Mapping) and isinstance(m := batch.get(k), torch.Tensor) and m.ndim == 2]
    dtype = getattr(model, "dtype", None)
    if isinstance(batch, Mapping) and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        batch = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # fp32 speech
                 for k, v in batch.items()}  # features for a bf16 model (its first conv refused them)
    try:
        model(**batch) if isinstance(batch, Mapping) else model(batch)
    except _StopForward:
        pass
    finally:
        _MASKS.clear()


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """A hooked input ``x [batch, seq, d]`` as rows ``[tokens, d]``, padding left out: positions a mask of the
    running batch (same ``[batch, seq]`` shape) marks 0. Inputs no mask matches (e.g. Whisper's encoder) are kept
    whole."""
    for mask in _MASKS:
        if x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            return x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


def run_batches(model: nn.Module, batches: Iterable[Any], desc: str = "calibration") -> None:
    """Forward every batch through ``model`` (no grad, eval mode restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(list(batches), desc=desc, leave=False):
                _forward(model, batch)
    finally:
        model.train(was_training)


@contextmanager
def input_hooks(model: nn.Module, names: Iterable[str], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, call ``fn(name, x)`` with each named module's first input ``x [..., in_features]``; inside
    :func:`truncated_passes`, a forward of ``model`` also stops once every named module has run."""
    names = list(dict.fromkeys(names))
    handles = []
    try:  # a bad name raises while registering: the hooks already attached are removed too
        for name in names:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(lambda _m, args, _n=name: fn(_n, args[0])))
        if _truncate and names:
            seen: set[str] = set()

            def done(name: str) -> None:
                seen.add(name)
                if len(seen) == len(names):
                    raise _StopForward

            handles += [model.get_submodule(n).register_forward_hook(lambda *_a, _n=n: done(_n)) for n in names]
            handles.append(model.register_forward_pre_hook(lambda *_a: seen.clear()))  # each forward starts afresh
        yield
    finally:
        for h in handles:
            h.remove()


def input_covariances(model: nn.Module, names: Iterable[str], batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Per module: ``XᵀX`` summed over all calibration tokens (float64 ``[in, in]``) divided by the token count."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = token_rows(x.detach()).to(torch.float64)
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    names = list(names)
    with input_hooks(model, names, add):
        run_batches(model, batches)
    for n in names:
        if not counts.get(n):
            raise ValueError(f"hf_compress: no calibration token reached {n} (every token padding, or the module "
                             "never ran); give batches with real tokens.")
    out = {n: sums[n] / counts[n] for n in sums}
    for n, cov in out.items():
        if not bool(torch.isfinite(cov).all()):
            raise ValueError(f"hf_compress: the calibration activations at {n} are not finite (NaN/inf inputs or "
                             "weights?); check the calibration batches.")
    return out


def input_samples(
    model: nn.Module, names: Iterable[str], batches: Iterable[Any], max_rows: int = 4096, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Per module: up to ``max_rows`` input rows ``[rows, in]`` sampled uniformly from the calibration tokens."""
    rows: dict[str, list[torch.Tensor]] = {}
    g = torch.Generator().manual_seed(seed)

    def add(name: str, x: torch.Tensor) -> None:
        rows.setdefault(name, []).append(token_rows(x.detach()).float().cpu())

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


def input_statistics_streamed(
    model: nn.Module, names: Iterable[str], batches: Iterable[Any], stat: str = "cov", max_bytes: int = 256 * 2**20
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int]]]:
    """Per-module input statistics, streamed in chunks of consecutive modules (one calibration pass per chunk).

    ``stat="cov"``: ``XᵀX / N`` (float64 ``[in, in]``); ``stat="abs_mean"``: ``mean |X|`` per channel (float64
    ``[in]``). Modules fed the very same tensor (e.g. Q/K/V after one norm) share one statistic object, so a
    chunk holds at most ``max_bytes`` of statistics (at least one module). Yields ``(stats, info)`` per chunk with
    ``info = {"chunk", "modules", "stat_bytes", "passes"}``; drop each chunk's stats before the next to stream.
    """
    if stat not in ("cov", "abs_mean"):
        raise ValueError(f"hf_compress.calibration: stat must be 'cov' or 'abs_mean', got {stat!r}.")
    names, batches = list(names), list(batches)
    if not batches:
        raise ValueError("hf_compress.calibration: no calibration batches given; pass a non-empty list.")

    def nbytes(name: str) -> int:
        n = _in_features(model.get_submodule(name))
        return 8 * (n * n if stat == "cov" else n)

    chunks: list[list[str]] = [[]]
    for name in names:
        if chunks[-1] and sum(map(nbytes, chunks[-1])) + nbytes(name) > max_bytes:
            chunks.append([])
        chunks[-1].append(name)
    for index, chunk in enumerate(chunks):
        out, stat_bytes = _chunk_statistics(model, chunk, batches, stat, f"calibration {index + 1}/{len(chunks)}")
        yield out, {"chunk": index, "modules": len(chunk), "passes": len(chunks), "stat_bytes": stat_bytes}
        del out


def _chunk_statistics(model: nn.Module, chunk: list[str], batches: list[Any], stat: str,
                      desc: str) -> tuple[dict[str, torch.Tensor], int]:
    """One calibration pass hooking ``chunk``; returns ``({name: stat}, bytes held)`` (shared inputs deduped)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    leader: dict[str, str] = {}  # module -> module whose statistic it shares
    live: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input kept alive, first module), per batch

    def add(name: str, x: torch.Tensor) -> None:
        seen = live.get(id(x))
        if seen is not None and seen[0] is x:
            leader.setdefault(name, seen[1])
            return
        live[id(x)] = (x, name)
        if leader.setdefault(name, name) != name:
            return
        x = token_rows(x.detach()).to(torch.float64)
        part = x.T @ x if stat == "cov" else x.abs().sum(0)
        sums[name] = sums[name] + part if name in sums else part
        counts[name] = counts.get(name, 0) + x.shape[0]

    was_training = model.training
    model.eval()
    try:
        with input_hooks(model, chunk, add), torch.inference_mode():
            for batch in tqdm(batches, desc=desc, leave=False):
                live.clear()
                _forward(model, batch)
    finally:
        live.clear()
        model.train(was_training)
    stats = {n: sums[n] / counts[n] for n in sums}
    out = {n: stats[leader[n]] for n in chunk if leader.get(n) in stats}
    return out, sum(t.numel() * t.element_size() for t in stats.values())


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if hasattr(module, "nx"):  # GPT-2 Conv1D
        return int(module.nx)
    weight = getattr(module, "weight", None)
    if weight is None:
        raise TypeError(f"hf_compress.calibration: {type(module).__name__} has no weight; hook linear layers only.")
    return int(weight.shape[-1])


def on_cpu(model: torch.nn.Module) -> bool:
    """Whether ``model`` sits on the CPU: Trainer then trains it there (``use_cpu``) instead of moving it to a GPU
    away from the teacher and the caller's other tensors."""
    return next(model.parameters()).device.type == "cpu"
