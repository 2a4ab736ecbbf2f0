"""Perplexity of a causal LM on a text: the metric the benchmarks report and ``hf-compress eval --text`` prints.

Sliding windows as in the Hugging Face perplexity guide; a tokenizer that prepends BOS by default (Gemma) gets BOS
in front of every window. Used by ``benchmarks.metrics`` (which re-exports :func:`perplexity`).
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from .calibration import restored_training_state


def tokenizer_bos(tokenizer: Any) -> int | None:
    """The BOS id if ``tokenizer`` prepends it by default (e.g. Gemma), else ``None`` (e.g. SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def encode_plain(tokenizer: Any, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens, at most ``max_tokens`` (tokenizes only a prefix if it can)."""
    if max_tokens is None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    chars = max(4096, 8 * max_tokens)
    while True:
        ids = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
        if len(ids) > max_tokens or chars >= len(text):
            return ids[:max_tokens]
        chars *= 2


def _windows(n: int, body: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_new)`` text-token windows as in the HF perplexity guide: each scores its last ``n_new``."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + body, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def _token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Summed float32 NLL of ``targets [b, t]`` under ``logits [b, t, V]``, in chunks of positions (memory)."""
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, targets.shape[1], chunk):
        lg = logits[:, s:s + chunk].float()
        total += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[:, s:s + chunk].reshape(-1),
                                                   reduction="sum").double().cpu()
    return total


@torch.inference_mode()
def perplexity(model: Any, tokenizer: Any, text: str, max_tokens: int = 16384, window: int = 1024, stride: int = 512,
               batch_size: int = 1) -> dict[str, Any]:
    """Sliding-window perplexity of a causal LM on the first ``max_tokens`` tokens of ``text``.

    Windows of ``window`` tokens start every ``stride`` tokens; each scores only the tokens not scored by the
    previous window (HF perplexity guide), so every token after the first is scored exactly once with up to
    ``window - stride`` tokens of context. If the tokenizer prepends BOS by default (Gemma), every window starts
    with BOS (context only) and the first text token is scored too. Deterministic (eval mode, no sampling).

    Returns ``{"ppl", "nll" (mean per scored token, nats), "tokens" (scored), "text_tokens", "window", "stride",
    "windows", "bos"}``.
    """
    if not 0 < stride <= window or window < 2:
        raise ValueError(f"perplexity: need 0 < stride <= window and window >= 2, got window={window}, stride={stride}")
    bos = tokenizer_bos(tokenizer)
    body = window - (bos is not None)
    stride = min(stride, body)
    ids = torch.tensor(encode_plain(tokenizer, text, max_tokens), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("perplexity: text has fewer than 2 tokens")
    device = next(iter(model.parameters()), torch.empty(0)).device
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    wins = _windows(ids.numel(), body, stride)
    nll, count = torch.zeros((), dtype=torch.float64), 0
    groups = [list(g) for _, g in itertools.groupby(wins, key=lambda w: (w[1] - w[0], w[2]))]
    batches = [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    with restored_training_state(model, flags=False):
        model.eval()
        for batch in tqdm(batches, desc="perplexity", unit="batch", leave=False):
            x = torch.stack([ids[b:e] for b, e, _ in batch])
            if bos is not None:
                x = torch.cat([torch.full((x.shape[0], 1), bos), x], dim=1)
            n_new = batch[0][2]
            n_pred = min(n_new, x.shape[1] - 1)  # without BOS the very first token has no prediction
            kwargs = {"logits_to_keep": n_pred + 1} if keep else {}
            logits = model(input_ids=x.to(device), **kwargs).logits
            logits = logits[:, -(n_pred + 1):-1]
            nll += _token_nll(logits, x[:, -n_pred:].to(logits.device))
            count += n_pred * x.shape[0]
    mean = float(nll / count)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "text_tokens": int(ids.numel()), "window": window,
            "stride": stride, "windows": len(wins), "bos": bos is not None}
