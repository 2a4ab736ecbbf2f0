"""Inputs of the ``hf-compress`` commands: the plan from the flags, tokenizers, calibration windows, dtypes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_PATTERN = r"self_attn\.(q|k|v|o)_proj$"  # --method's default targets (Llama-style names)


class CLIError(Exception):
    """A user error: printed as ``hf-compress: error: ...`` with exit status 2."""


def load_plan(args: argparse.Namespace) -> Any:
    import json

    from .config import CompressionConfig, MethodConfig

    given = [flag for flag, value in (("--config", args.config), ("--method", args.method),
                                      ("--budget", getattr(args, "budget", None))) if value is not None]
    if len(given) > 1:
        raise CLIError(f"give one plan, not {' and '.join(given)}: --config plan.json, --method NAME [...], or "
                       "--budget FRACTION")
    method_only = [flag for flag, value in (("--rank", args.rank), ("--rank-ratio", args.rank_ratio),
                                            ("--param", args.param), ("--pattern", args.pattern != DEFAULT_PATTERN))
                   if value not in (None, False)]
    budget_only = [flag for flag in ("--methods", "--plan-out") if getattr(args, flag[2:].replace("-", "_"), None)]
    if method_only and not args.method:
        raise CLIError(f"{', '.join(method_only)} set(s) the --method plan; with {given[0] if given else 'no plan'} "
                       "it would be ignored: drop it, or use --method NAME")
    if budget_only and getattr(args, "budget", None) is None:
        raise CLIError(f"{', '.join(budget_only)} only work(s) with --budget; drop it or give --budget FRACTION")
    if args.config:
        if not Path(args.config).is_file():
            raise CLIError(f"--config file {args.config} does not exist")
        try:
            data = json.loads(Path(args.config).read_text())
        except json.JSONDecodeError as err:
            raise CLIError(f"--config {args.config} is not valid JSON: {err}") from err
        if isinstance(data, dict) and "modules" not in data and isinstance(data.get("config"), dict):
            data = data["config"]  # a --plan-out / sweep --table file: its plan
        return CompressionConfig.from_dict(data)
    if args.method:
        params: dict[str, Any] = {"type": args.method}
        if args.rank is not None:
            params["rank"] = args.rank
        if args.rank_ratio is not None:
            params["rank_ratio"] = args.rank_ratio
        for item in args.param or []:
            key, _, value = item.partition("=")
            params[key] = parse_value(value)
        return CompressionConfig(modules={args.pattern: MethodConfig.from_dict(params)})
    if getattr(args, "budget", None) is not None:
        return None  # planned after loading
    raise CLIError("give a plan: --config plan.json, --method NAME [...], or --budget FRACTION")


def parse_value(value: str) -> Any:
    import json

    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model", "*.model", "*.spm", "*.tiktoken")


def has_tokenizer(source: str) -> bool:
    """Whether ``source`` has tokenizer files (a Hub id: assumed; transformers 5 builds an empty tokenizer from a
    folder without any instead of raising)."""
    return not Path(source).is_dir() or any(p.is_file() for name in _TOKENIZER_FILES for p in Path(source).glob(name))


def tokenizer_of(source: str, why: str, processor: bool = False) -> Any:
    """The tokenizer (or speech processor) of ``source``; a CLIError naming ``why`` it is needed if it has none."""
    import transformers

    if not has_tokenizer(source):
        raise CLIError(f"{why} needs a tokenizer in {source}, which has no tokenizer files "
                       f"({', '.join(_TOKENIZER_FILES[:3])} ...): copy the dense model's tokenizer files there")
    try:
        return (transformers.AutoProcessor if processor else transformers.AutoTokenizer).from_pretrained(source)
    except (OSError, ValueError) as err:
        raise CLIError(f"{why} needs a tokenizer in {source}: {err}") from err


def check_seq_len(model: Any, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse token windows longer than a learned position table (GPT-2's ``wpe``, BERT's ``position_embeddings``):
    an IndexError deep in the forward otherwise. Rotary models (Llama ...) run longer windows; speech models read
    features."""
    from torch import nn

    if getattr(model.config, "num_mel_bins", None):
        return
    tables = [m.num_embeddings for n, m in model.named_modules()
              if isinstance(m, nn.Embedding) and (n.endswith("wpe") or "position_embeddings" in n)]
    if tables and seq_len > min(tables):
        raise CLIError(f"{flag} {seq_len} is longer than {type(model).__name__}'s {min(tables)} learned positions; "
                       f"pass {flag} {min(tables)} or less")


def save_preprocessor(source: str, out: Path) -> None:
    """Copy the tokenizer / processor of ``source`` next to the compressed weights, if it has one."""
    from transformers import AutoProcessor, AutoTokenizer

    if not has_tokenizer(source) and not (Path(source) / "preprocessor_config.json").is_file():
        return
    for loader in (AutoProcessor, AutoTokenizer):
        try:
            loader.from_pretrained(source).save_pretrained(out)
            return
        except (OSError, ValueError, TypeError, KeyError):
            continue


def text_windows(model: Any, args: argparse.Namespace) -> list[Any] | None:
    """``--calib-text`` as ``[1, --seq-len]`` token windows (at most ``--n-batches``), or None without it."""
    if not args.calib_text:
        return None

    from . import sweep as sw

    if getattr(model.config, "num_mel_bins", None):
        raise CLIError("--calib-text is token text; a speech model calibrates on audio: leave --calib-text out "
                       "(random audio features) or compress from Python with real audio batches")
    if not Path(args.calib_text).is_file():
        raise CLIError(f"--calib-text file {args.calib_text} does not exist")
    tok = tokenizer_of(args.model, "--calib-text")
    check_seq_len(model, args.seq_len)
    return sw.text_batches(tok, Path(args.calib_text).read_text(), args.n_batches, args.seq_len)


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def checkpoint_dtype(config: Any) -> Any:
    """The floating dtype a checkpoint's config records (``dtype`` / legacy ``torch_dtype``), else float32."""
    import torch

    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        value = getattr(torch, value, None) if isinstance(value, str) else value
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return torch.float32


def dtype_arg(name: str | None) -> Any:
    import torch

    return None if name in (None, "auto") else getattr(torch, name)
