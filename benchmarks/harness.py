"""Shared measurement harness: fixed, stated budgets; one JSON record per setting; dense and compressed in one run.

Every suite (``benchmarks/suites/*.py``) and the runner write through :class:`Bench`, so all results share one
schema: ``{"suite", "created", "machine", "budgets", "records": [{"model", "method", "setting", "quality",
"size", "latency", "ratios", "extra"}]}``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_compress.evaluation import PPL_BUDGETS

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Fixed budgets, written into every results file. "quick" is for smoke tests and CI.
BUDGETS: dict[str, dict[str, Any]] = {
    name: {"ppl_tokens": PPL_BUDGETS[name]["max_tokens"], "ppl_window": PPL_BUDGETS[name]["window"],
           "ppl_stride": PPL_BUDGETS[name]["stride"], **rest}
    for name, rest in (("default", {"wer_utterances": None, "latency_batch": 1, "latency_seq": 256,
                                    "decode_new_tokens": 32}),
                       ("quick", {"wer_utterances": 16, "latency_batch": 1, "latency_seq": 64,
                                  "decode_new_tokens": 8}))
}
# The quality metric each plot puts on its y axis, and whether lower is better.
PRIMARY_METRIC = {"causal-lm": ("ppl", True), "speech-seq2seq": ("wer", True), "encoder": ("lee50_spearman", False)}


def model_kind(model: Any) -> str:
    """``causal-lm``, ``speech-seq2seq`` or ``encoder`` for a loaded HF model."""
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return "speech-seq2seq"
    if hasattr(model, "generate") and model.can_generate():
        return "causal-lm"
    return "encoder"


def quality(model: Any, tok: Any, kind: str | None = None, budget: str = "default",
            voices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Quality metrics for ``model`` with the fixed budget: perplexity on the eval text (causal LM), the three
    encoder scores (encoder), or corpus WER per voice on the speech test split (speech)."""
    from . import data, metrics

    kind = kind or model_kind(model)
    b = BUDGETS[budget]
    if kind == "causal-lm":
        r = metrics.perplexity(model, tok, data.eval_text(), max_tokens=b["ppl_tokens"], window=b["ppl_window"],
                               stride=b["ppl_stride"])
        return {"ppl": r["ppl"], "ppl_tokens": r.get("tokens"), "ppl_window": b["ppl_window"]}
    if kind == "encoder":
        return dict(metrics.encoder_scores(model, tok))
    if kind == "speech-seq2seq":
        speech = data.speech_set() if voices is None else data.speech_set(voices=voices)
        out: dict[str, Any] = {}
        for voice, split in speech.items():
            utts = split["test"][: b["wer_utterances"]] if b["wer_utterances"] else split["test"]
            out[f"wer_{voice}"] = metrics.wer(model, tok, utts)["wer"]
        out["wer"] = sum(v for k, v in out.items() if k.startswith("wer_")) / max(1, len(speech))
        return out
    raise ValueError(f"benchmarks: unknown model kind {kind!r}")


def size(model: Any, embedding_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """Unique parameter count, and bytes on disk of ``save_pretrained`` (weights files) in a temp dir."""
    from . import metrics

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        disk = metrics.disk_bytes(tmp)
    out = {"params": metrics.param_count(model), "disk_bytes": disk["weights"] if isinstance(disk, dict) else disk}
    for name in embedding_names:
        out[f"params_{name}"] = sum(p.numel() for p in model.get_submodule(name).parameters())
    return out


def latency(model: Any, kind: str | None = None, budget: str = "default", seed: int = 0) -> dict[str, float]:
    """Median forward latency on a fixed random batch and greedy decode tokens/s (generative models)."""
    return paired_latency({"model": model}, kind, budget, seed)["model"]


def paired_latency(models: dict[str, Any], kind: str | None = None, budget: str = "default", seed: int = 0,
                   rounds: int = 5) -> dict[str, dict[str, float]]:
    """:func:`latency` of several models (e.g. dense and compressed) measured **interleaved**: every round times
    each model once in turn, so a shared, noisy machine slows them alike and their ratio stays meaningful.

    Returns ``{name: {"forward_s": median seconds, "decode_tokens_per_s": ...}}`` (decode for generative kinds);
    every model after the first also gets ``forward_ratio`` / ``decode_ratio``: the median over rounds of its
    figure divided by the first model's in the same round (a burst of load on the shared CPU spoils one round's
    pair, not the median).
    """
    from . import metrics

    first = next(iter(models.values()))
    kind = kind or model_kind(first)
    b = BUDGETS[budget]
    g = torch.Generator().manual_seed(seed)
    if kind == "speech-seq2seq":
        feats = torch.randn(b["latency_batch"], first.config.num_mel_bins, 3000, generator=g)
        dec = torch.full((b["latency_batch"], 4), first.config.decoder_start_token_id)
        inputs, prompt = {"input_features": feats, "decoder_input_ids": dec}, feats
    else:
        ids = torch.randint(0, first.config.vocab_size, (b["latency_batch"], b["latency_seq"]), generator=g)
        inputs, prompt = {"input_ids": ids}, ids[:, :16]
    fwd: dict[str, list[float]] = {name: [] for name in models}
    dec_rate: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        metrics.forward_latency(model, inputs, repeats=1, warmup=1)
    for _ in range(rounds):
        for name, model in models.items():
            fwd[name].append(metrics.forward_latency(model, inputs, repeats=1, warmup=0)["median_s"])
    if kind != "encoder":
        for _ in range(rounds):
            for name, model in models.items():
                dec_rate[name].append(metrics.decode_tokens_per_s(model, prompt, new_tokens=b["decode_new_tokens"],
                                                                  repeats=1))
    out = {}
    ref = next(iter(models))
    for name in models:
        out[name] = {"forward_s": statistics.median(fwd[name])}
        if dec_rate[name]:
            out[name]["decode_tokens_per_s"] = statistics.median(dec_rate[name])
        if name != ref:
            out[name]["forward_ratio"] = statistics.median(a / b for a, b in zip(fwd[name], fwd[ref]))
            if dec_rate[name]:
                out[name]["decode_ratio"] = statistics.median(a / b for a, b in zip(dec_rate[name], dec_rate[ref]))
    return out


def ratios(compressed: dict[str, Any], dense: dict[str, Any]) -> dict[str, float]:
    """``compressed / dense`` for every numeric key the two records share (quality, size, latency flattened)."""
    out = {}
    for section in ("quality", "size", "latency"):
        for key, value in (compressed.get(section) or {}).items():
            base = (dense.get(section) or {}).get(key)
            if isinstance(value, (int, float)) and isinstance(base, (int, float)) and base:
                out[f"{key}"] = value / base
    return out


class Bench:
    """Collects records of one suite and writes ``benchmarks/results/<suite>.json``."""

    def __init__(self, suite: str, budget: str = "default", description: str = "") -> None:
        self.suite, self.budget, self.description = suite, budget, description
        self.records: list[dict[str, Any]] = []
        self.started = time.time()

    def record(self, model: str, method: str, setting: dict[str, Any] | None = None, quality: dict | None = None,
               size: dict | None = None, latency: dict | None = None, extra: dict | None = None,
               dense: dict[str, Any] | None = None) -> dict[str, Any]:
        """Add one measured setting; pass the same model's dense record as ``dense`` to get ratios."""
        rec = {"model": model, "method": method, "setting": setting or {}, "quality": quality or {},
               "size": size or {}, "latency": latency or {}, "extra": extra or {}}
        if dense is not None:
            rec["ratios"] = ratios(rec, dense)
        self.records.append(rec)
        return rec

    def save(self, path: str | os.PathLike | None = None) -> Path:
        from . import metrics

        out = Path(path) if path else RESULTS_DIR / f"{self.suite}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"suite": self.suite, "description": self.description,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "wall_s": round(time.time() - self.started, 1), "machine": metrics.machine_info(),
               "budget": {self.budget: BUDGETS[self.budget]}, "records": self.records}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, out)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
