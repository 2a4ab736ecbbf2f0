"""Quality measures: the perplexity of a causal LM on a text (the metric the benchmarks report and ``hf-compress eval
--text`` prints), and the quick probes the sweep and planner compare models with (output error, windowed perplexity).

Sliding windows as in the Hugging Face perplexity guide; a tokenizer that prepends BOS by default (Gemma) gets BOS
in front of every window. Used by ``benchmarks.metrics`` (which re-exports :func:`perplexity`).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
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


# the benchmarks' perplexity budgets (``benchmarks.harness.BUDGETS`` reads these): tokens scored, window, stride
PPL_BUDGETS = {"default": {"max_tokens": 4096, "window": 1024, "stride": 1024},
               "quick": {"max_tokens": 1024, "window": 512, "stride": 512}}


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
            if n_pred == 0:  # a last window of one token and no BOS: nothing it could score
                continue
            kwargs = {"logits_to_keep": n_pred + 1} if keep else {}
            logits = model(input_ids=x.to(device), **kwargs).logits
            logits = logits[:, -(n_pred + 1):-1]
            nll += _token_nll(logits, x[:, -n_pred:].to(logits.device))
            count += n_pred * x.shape[0]
    mean = float(nll / count)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "text_tokens": int(ids.numel()), "window": window,
            "stride": stride, "windows": len(wins), "bos": bos is not None}


# ------------------------------------------------------------------- probes of the sweep and planner (CLI)
def random_batches(model: nn.Module, n: int = 4, seq: int = 32, seed: int = 0) -> list[Any]:
    """``n`` seeded probe batches: token ids ``[1, seq]``, or (speech) ``{"input_features", "decoder_input_ids"}``
    (features in the model's dtype)."""
    g, cfg = torch.Generator().manual_seed(seed), model.config
    if getattr(cfg, "num_mel_bins", None):
        frames = 2 * cfg.max_source_positions
        dtype = getattr(model, "dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else None
        return [{"input_features": torch.randn(1, cfg.num_mel_bins, frames, generator=g).to(dtype),
                 "decoder_input_ids": torch.randint(0, cfg.vocab_size, (1, 4), generator=g)} for _ in range(n)]
    return [torch.randint(0, cfg.vocab_size, (1, seq), generator=g) for _ in range(n)]


def text_batches(tokenizer: Any, text: str, n: int = 8, seq: int = 128) -> list[torch.Tensor]:
    """Up to ``n`` consecutive ``[1, seq]`` token windows of ``text``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: n * seq])
    if ids.numel() < seq:
        raise ValueError(f"hf_compress.evaluation: the text has {ids.numel()} tokens, fewer than one window of {seq}.")
    return [w.unsqueeze(0) for w in ids[: ids.numel() // seq * seq].view(-1, seq)]


def _outputs(model: nn.Module, batch: Any) -> torch.Tensor:
    """Logits, else the last hidden states with the pooled output (encoders such as BERT) appended as one more
    position, so a change to the pooler counts too: ``[batch, positions, d]``."""
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    if getattr(out, "logits", None) is not None:
        return out.logits
    pooled = getattr(out, "pooler_output", None)
    hidden = out.last_hidden_state
    return hidden if pooled is None else torch.cat([hidden, pooled[:, None].to(hidden.dtype)], 1)


def output_error_fn(model: nn.Module, batches: Sequence[Any]) -> Callable[[nn.Module], float]:
    """``m -> ‖out(m) − out(dense)‖ / ‖out(dense)‖`` over ``batches`` (dense outputs captured now; lower is better)."""
    with torch.inference_mode():
        refs = [_outputs(model, b).float() for b in batches]

    def fn(m: nn.Module) -> float:
        with torch.inference_mode():
            err = sum(float((_outputs(m, b).float() - r).pow(2).sum()) for b, r in zip(batches, refs))
        return math.sqrt(err / sum(float(r.pow(2).sum()) for r in refs))
    return fn


def perplexity_fn(batches: Sequence[torch.Tensor]) -> Callable[[nn.Module], float]:
    """``m -> exp(mean next-token NLL)`` of a causal LM over ``[batch, seq]`` windows of token ids."""
    def fn(m: nn.Module) -> float:
        nll, count = 0.0, 0
        with torch.inference_mode():
            for b in batches:
                logits = m(b).logits[:, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(),
                                                               reduction="sum"))
                count += b[:, 1:].numel()
        return math.exp(nll / count)
    return fn
