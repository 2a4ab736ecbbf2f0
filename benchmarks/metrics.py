"""Benchmark metrics: sliding-window perplexity and efficiency (size, latency, decode speed, memory, machine).

Encoder metrics live in :mod:`benchmarks.encoder_eval` and WER in :mod:`benchmarks.asr`; both are re-exported here,
so ``metrics.encoder_scores``, ``metrics.wer`` etc. work.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hf_compress.evaluation import perplexity

from .asr import basic_normalize, edit_distance, normalize_text, transcribe, wer, wer_details, word_error_rate
from .encoder_eval import (
    encoder_scores,
    eval_mode,
    fit_logistic,
    lee50_spearman,
    model_device,
    polarity_accuracy,
    sentence_embeddings,
    simlex999_spearman,
    spearman,
    wordsim353_spearman,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin")


# ---------------------------------------------------------------------------------------------- perplexity
# perplexity(): hf_compress.evaluation (the same metric for ``hf-compress eval --text``), re-exported above


# ---------------------------------------------------------------------------------------------- size
def param_count(model: torch.nn.Module) -> int:
    """Unique weight elements: parameters plus persistent buffers (e.g. codebooks, packed indices), each storage
    view counted once (tied embeddings count once); non-persistent buffers (rotary ``inv_freq``, ``position_ids``)
    are not weights and are skipped."""
    persistent = set(model.state_dict(keep_vars=True).keys())
    seen, total = set(), 0
    tensors = itertools.chain(((n, t, True) for n, t in model.named_parameters()),
                              ((n, t, False) for n, t in model.named_buffers()))
    for name, t, is_param in tensors:
        if not is_param and (name not in persistent or name.endswith(("position_ids", "token_type_ids"))):
            continue
        key: Any = id(t) if t.device.type == "meta" else (
            t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def disk_bytes(path: str | os.PathLike) -> dict[str, int]:
    """``{"weights": bytes of *.safetensors / *.bin files, "total": bytes of every file}`` under a saved folder."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"disk_bytes: {root} is not a folder (pass the save_pretrained directory)")
    files = [p for p in root.rglob("*") if p.is_file()]
    return {"weights": sum(p.stat().st_size for p in files if p.name.endswith(WEIGHT_SUFFIXES)),
            "total": sum(p.stat().st_size for p in files)}


# ---------------------------------------------------------------------------------------------- speed
@torch.inference_mode()
def forward_latency(model: Any, inputs: dict[str, torch.Tensor], repeats: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Wall time of ``model(**inputs)``: ``{"median_s", "min_s", "times_s", "repeats", "warmup", "threads"}``."""
    if repeats < 1:
        raise ValueError("forward_latency: repeats must be >= 1")
    device = model_device(model)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    times = []
    with eval_mode(model):
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times, "repeats": repeats,
            "warmup": warmup, "threads": torch.get_num_threads()}


@torch.inference_mode()
def decode_tokens_per_s(model: Any, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy ``generate`` throughput: ``batch * new_tokens / median seconds`` (prefill included; the length is
    fixed by ``min_new_tokens = max_new_tokens``). ``input_ids [b, t]`` int64, or for encoder-decoder speech models
    ``input_features [b, mels, frames]`` float."""
    device = model_device(model)
    x = input_ids.to(device)
    key = "input_features" if x.is_floating_point() else "input_ids"
    if key == "input_features":
        x = x.to(next(model.parameters()).dtype)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
    pad = pad[0] if isinstance(pad, list) else pad

    def run(n: int) -> float:
        start = time.perf_counter()
        model.generate(**{key: x}, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                       pad_token_id=pad)
        return time.perf_counter() - start

    with eval_mode(model):
        run(2)  # warm-up
        seconds = statistics.median(run(new_tokens) for _ in range(max(1, repeats)))
    return x.shape[0] * new_tokens / seconds


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t: ...`` then ``t["seconds"]`` holds the block's wall time."""
    out = {"seconds": float("nan")}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- memory
def current_rss() -> int:
    """Resident set size of this process in bytes (``VmRSS`` of ``/proc/self/status``; Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("current_rss: no VmRSS line in /proc/self/status")


def peak_rss_of_process() -> int:
    """Peak RSS of this process since it started, bytes (``resource.getrusage`` ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakRSS:
    """Peak resident memory during a block, sampled by a background thread every ``interval`` seconds.

    ``with PeakRSS() as m: ...`` then ``m.baseline`` (bytes at entry), ``m.peak`` (max seen), ``m.delta``
    (peak - baseline), ``m.as_dict()``. Short spikes between two samples (~5 ms) can be missed.
    """

    def __init__(self, interval: float = 0.005) -> None:
        if not os.path.exists("/proc/self/status"):
            raise RuntimeError("PeakRSS needs Linux /proc; use peak_rss_of_process() elsewhere")
        self.interval = interval
        self.baseline = self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak = max(self.peak, current_rss())
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = current_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="PeakRSS", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def delta(self) -> int:
        return self.peak - self.baseline

    def as_dict(self) -> dict[str, int]:
        return {"baseline_bytes": self.baseline, "peak_bytes": self.peak, "delta_bytes": self.delta,
                "samples": self.samples}


# ---------------------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, torch threads, and python/torch/transformers/peft/numpy versions."""
    import numpy
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    mem = None
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": affinity, "torch_threads": torch.get_num_threads(),
            "memory_bytes": mem, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft_version, "numpy": numpy.__version__}


__all__ = ["PeakRSS", "basic_normalize", "current_rss", "decode_tokens_per_s", "disk_bytes", "edit_distance",
           "encoder_scores", "fit_logistic", "forward_latency", "lee50_spearman", "machine_info", "normalize_text",
           "param_count", "peak_rss_of_process", "perplexity", "polarity_accuracy", "sentence_embeddings",
           "simlex999_spearman", "spearman", "timed", "transcribe", "wer", "wer_details", "word_error_rate",
           "wordsim353_spearman"]
