"""``python -m benchmarks run``: dense vs compressed on one real model in the same run, one JSON record."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig

from .harness import RESULTS_DIR, Bench, paired_latency, quality, size

CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"

# Attention projections per model kind (Llama-family/GPT-2 style, Whisper, BERT).
ATTENTION = {
    "causal-lm": r"(self_attn\.(q|k|v|o)_proj|attn\.(c_attn|c_proj))$",
    "speech-seq2seq": r"(self_attn|encoder_attn)\.(q|k|v|out)_proj$",
    "encoder": r"attention\.(self\.(query|key|value)|output\.dense)$",
}
PRESETS: dict[str, Callable[[str], CompressionConfig]] = {
    "lowrank-attn-0.5": lambda kind: CompressionConfig(modules={ATTENTION[kind]: LowRankConfig(rank_ratio=0.5)}),
    "lowrank-attn-0.75": lambda kind: CompressionConfig(modules={ATTENTION[kind]: LowRankConfig(rank_ratio=0.75)}),
}
DEFAULT_PRESET = "lowrank-attn-0.75"
AUTO = {
    "causal-lm": hf_compress.AutoCompressedModelForCausalLM,
    "speech-seq2seq": hf_compress.AutoCompressedModelForSpeechSeq2Seq,
    "encoder": hf_compress.AutoCompressedModel,
}


def kind_of(name: str) -> str:
    from . import zoo

    return {"causal-lm": "causal-lm", "encoder": "encoder", "speech-seq2seq": "speech-seq2seq"}[zoo.ZOO[name].kind]


def _reload_class(kind: str) -> Any:
    import transformers

    return {"causal-lm": transformers.AutoModelForCausalLM, "speech-seq2seq": transformers.AutoModelForSpeechSeq2Seq,
            "encoder": transformers.AutoModel}[kind]


def _probe_inputs(model: Any, kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "speech-seq2seq":
        return {"input_features": torch.randn(1, model.config.num_mel_bins, 3000, generator=g),
                "decoder_input_ids": torch.full((1, 4), model.config.decoder_start_token_id)}
    return {"input_ids": torch.randint(0, model.config.vocab_size, (1, 32), generator=g)}


def _output(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def memory_probe(path: Path, kind: str, plan: CompressionConfig) -> dict[str, Any]:
    """Peak resident memory of compress-on-load in a fresh process, above the process's RSS after imports, with every
    parameter of the loaded model read (so memory-mapped weights count).

    Returns ``{"rss_after_imports", "peak_rss", "peak_increment", "dense_fp32_bytes", "peak_over_dense"}``.
    """
    code = (
        "import json, sys, torch, hf_compress\n"
        "from benchmarks.metrics import PeakRSS\n"
        "from benchmarks.runner import AUTO\n"
        f"plan = hf_compress.CompressionConfig.from_json({plan.to_json()!r})\n"
        "with PeakRSS() as rss:\n"
        f"    m = AUTO[{kind!r}].from_pretrained({str(path)!r}, compression_config=plan, dtype=torch.float32)\n"
        # Weights loaded from safetensors can stay memory-mapped and count as resident only once read: touch every
        # parameter so the loaded model is fully counted, not only the pages compression happened to read.
        "    with torch.no_grad():\n"
        "        touched = sum(float(p.float().sum()) for p in m.parameters())\n"
        "cfg = m.config\n"
        "print(json.dumps({'baseline': rss.baseline, 'peak': rss.peak}))\n"
    )
    env_root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=env_root, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks: memory probe failed:\n{proc.stderr[-3000:]}")
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    dense_bytes = _dense_fp32_bytes(path)
    increment = probe["peak"] - probe["baseline"]
    return {"rss_after_imports": probe["baseline"], "peak_rss": probe["peak"], "peak_increment": increment,
            "dense_fp32_bytes": dense_bytes, "peak_over_dense": increment / dense_bytes}


def _dense_fp32_bytes(path: Path) -> int:
    """Bytes the checkpoint's tensors take in fp32 (numel × 4), read from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                numel = 1
                for dim in sf.get_slice(key).get_shape():
                    numel *= dim
                total += numel * 4
    return total


def run(model_name: str, plan: CompressionConfig, label: str, budget: str = "default",
        save_dir: str | None = None, measure_memory: bool = True, out: str | None = None) -> dict[str, Any]:
    """Measure dense and compressed ``model_name`` in one run; write ``results/run-<model>-<label>.json``."""
    from . import data, zoo

    torch.manual_seed(0)
    kind = kind_of(model_name)
    path = zoo.resolve(model_name)
    bench = Bench(f"run-{model_name}-{label}", budget=budget, description=f"{model_name}: dense vs {label}")

    print(f"[benchmarks] dense {model_name} ({path})", flush=True)
    dense_model, tok = zoo.load(model_name)
    dense_quality, dense_size = quality(dense_model, tok, kind, budget), size(dense_model)
    probe_in = _probe_inputs(dense_model, kind)

    memory = memory_probe(path, kind, plan) if measure_memory else None
    calibrated = any(not isinstance(c, LowRankConfig) or c.reads_activations for c in plan.modules.values())
    # only a plan that reads activations gets calibration: with it, from_pretrained cannot stream the load
    calibration = (data.calibration_batches(tok, n_samples=16, seq_len=256)
                   if kind == "causal-lm" and calibrated else None)
    print(f"[benchmarks] compress-on-load with {label}", flush=True)
    t0 = time.perf_counter()
    model = AUTO[kind].from_pretrained(str(path), compression_config=plan, calibration=calibration,
                                       dtype=torch.float32)
    compress_s = time.perf_counter() - t0
    model.config.compression_config["base_model"] = zoo.ZOO[model_name].hub_id  # the zoo folder stands in for it
    target = Path(save_dir) if save_dir else Path(tempfile.mkdtemp(prefix=f"hf_compress-{model_name}-"))
    model.save_pretrained(target)
    tok.save_pretrained(target)
    reloaded = _reload_class(kind).from_pretrained(str(target))
    identical = bool(torch.equal(_output(model, probe_in), _output(reloaded, probe_in)))
    del reloaded
    print("[benchmarks] latency, dense and compressed interleaved", flush=True)
    lat = paired_latency({"dense": dense_model, "compressed": model}, kind, budget)
    del dense_model
    dense = bench.record(model_name, "dense", quality=dense_quality, size=dense_size, latency=lat["dense"])
    rec = bench.record(
        model_name, label, setting=plan.to_dict(), quality=quality(model, tok, kind, budget), size=size(model),
        latency=lat["compressed"],
        extra={"compress_s": compress_s, "memory": memory, "saved_to": str(save_dir) if save_dir else None,
               "reload_identical": identical, "streamed_load": calibration is None},
        dense=dense,
    )
    result_path = bench.save(Path(out) if out else None)
    card = write_card(model, model_name, label, dense, rec, target, result_path, public=out is None)
    _print_summary(dense, rec, result_path, target)
    print(f"model card: {card}")
    return rec


def write_card(model: Any, model_name: str, label: str, dense: dict[str, Any], rec: dict[str, Any], target: Path,
               result_path: Path, public: bool) -> Path:
    """Model card with this run's figures, into the saved folder and (for committed runs) ``model_cards/``."""
    from hf_compress.cards import model_card

    from . import zoo

    figures = {"results file": f"`benchmarks/results/{result_path.name}`"}
    for key, value in rec["quality"].items():
        base = dense["quality"].get(key)
        if isinstance(value, float) and isinstance(base, float):
            figures[key] = f"{value:.4g} (dense {base:.4g})"
    for section, key in (("size", "params"), ("size", "disk_bytes"), ("latency", "forward_s"),
                         ("latency", "decode_tokens_per_s")):
        if key in rec[section] and key in dense[section]:
            figures[key] = f"{rec[section][key]:.4g} ({rec[section][key] / dense[section][key]:.3f}x dense)"
    repo_id = f"your-username/{zoo.ZOO[model_name].hub_id.rsplit('/', 1)[-1]}-{label}"  # where a user would push it
    card = model_card(model, repo_id=repo_id, figures=figures)
    card.save(target / "README.md")
    if not public:
        return target / "README.md"
    path = CARDS_DIR / f"{model_name}-{label}.md"
    path.parent.mkdir(exist_ok=True)
    card.save(path)
    return path


def _print_summary(dense: dict[str, Any], rec: dict[str, Any], path: Path, saved: Path) -> None:
    rows = [("", "dense", "compressed", "ratio")]
    for section in ("quality", "size", "latency"):
        for key, value in rec[section].items():
            base = dense[section].get(key)
            if isinstance(value, (int, float)) and isinstance(base, (int, float)):
                rows.append((key, f"{base:.4g}", f"{value:.4g}", f"{value / base:.3f}" if base else "-"))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    extra = rec["extra"]
    print(f"compression time {extra['compress_s']:.1f} s; reload logits identical: {extra['reload_identical']}")
    if extra.get("memory"):
        m = extra["memory"]
        print(f"compress-on-load peak RSS increment {m['peak_increment'] / 2**20:.0f} MiB = "
              f"{m['peak_over_dense']:.2f}x dense fp32 ({m['dense_fp32_bytes'] / 2**20:.0f} MiB)")
    print(f"saved model: {saved}\nresults: {path}")


def results_dir() -> Path:
    return RESULTS_DIR
