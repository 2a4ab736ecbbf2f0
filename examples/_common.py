"""Helpers shared by the example scripts: a model name -> folder / (model, tokenizer), and the benchmark texts.

A name is a local folder, a Hub id (``owner/name``) or a ``benchmarks.zoo`` name (materialized offline from this
repository's ``benchmarks`` package).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import transformers


def _benchmarks() -> Any:
    """This repository's ``benchmarks`` package (the examples live beside it)."""
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import benchmarks.data
    import benchmarks.zoo

    return benchmarks


def is_local_or_hub(name: str) -> bool:
    return Path(name).is_dir() or "/" in name


def resolve(name: str) -> str:
    """A folder or Hub id as is; a zoo name as its local folder."""
    return name if is_local_or_hub(name) else str(_benchmarks().zoo.resolve(name))


def load_causal_lm(name: str) -> tuple[Any, Any]:
    """(causal LM in eval mode, tokenizer) for a folder, Hub id or zoo name."""
    if is_local_or_hub(name):
        return (transformers.AutoModelForCausalLM.from_pretrained(name).eval(),
                transformers.AutoTokenizer.from_pretrained(name))
    return _benchmarks().zoo.load(name)


def calibration_text() -> str:
    """The benchmark calibration text (news articles)."""
    return _benchmarks().data.calibration_text()


def eval_text() -> str:
    """The benchmark evaluation text (Wikipedia), disjoint from :func:`calibration_text`."""
    return _benchmarks().data.eval_text()


def token_windows(tok: Any, text: str, n: int, seq_len: int, need: str = "n_samples * seq_len") -> list[torch.Tensor]:
    """The first ``n`` consecutive windows ``[1, seq_len]`` of ``text``'s token ids; exits with a clear message
    (naming ``need``, the count the caller's flags ask for) when the text is too short."""
    ids = torch.tensor(tok(text)["input_ids"])
    if ids.numel() < n * seq_len:
        raise SystemExit(f"the text has {ids.numel()} tokens; need {need} = {n * seq_len}")
    return list(ids[: n * seq_len].view(n, 1, seq_len))
