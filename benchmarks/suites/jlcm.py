"""JLCM suite: quality vs bits for round-to-nearest, plain k-means, GPTQ and JLCM codebooks, one run per model.

``python -m benchmarks suite jlcm [--schedule smollm2-135m:3,2 minilm-l6:3] [--budget quick] [--block-size 192]
[--vector-dim 2]``

Every compressed setting quantizes *all* linear layers of the transformer blocks (embeddings and the tied LM head
stay dense) with the same storage layout for the three methods (``CodebookConfig.layout``: balanced row groups of
``--group-size`` similar neurons, one fp16 codebook per group, packed indices, and with ``--block-size B`` an fp16
scale and offset per (row, block of B input columns)), so the methods cost exactly the same bytes. With blocks,
``rtn`` is asymmetric round-to-nearest with groups of B (uniform codebook on each block's [min, max]; min and scale
in fp16).
The input covariances ``XᵀX/n`` of every layer are collected once per model from the dense model on the
calibration text (disjoint from the evaluation text) and reused across bit widths. The ``--schedule`` runs the
most important settings first (each model is loaded and calibrated once and kept), saving after every setting.

SmolLM2 quirk: the zoo weights are dequantized Q4_1 GGUF (a 4-bit grid per block of 32 inputs, each block with its
own scale and minimum). The default block of 192 columns spans six Q4_1 blocks with (in general) six different
scales and minima, and one affine map per block with one 16-entry codebook per 32-row group cannot reproduce six
different grids, so 4 bits is *not* lossless here (blocks of 32, aligned with the grid, would make 4-bit RTN
exact). The per-layer output error at 4 bits is reported as ``layer_loss`` and is > 0.
"""

from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODELS = {  # zoo name -> pattern matching every linear layer of the transformer blocks
    "smollm2-135m": r"(q|k|v|o|gate|up|down)_proj$",
    "minilm-l6": r"encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "whisper-tiny.en": r"layers\.\d+\.(self_attn|encoder_attn)\.(q|k|v|out)_proj$|layers\.\d+\.fc(1|2)$",
}
METHODS = ("rtn", "kmeans", "gptq", "jlcm")
# most important settings first: the goal bits (3) on every model, then the rest of the bits-per-weight curve
SCHEDULE = ("smollm2-135m:3", "whisper-tiny.en:3", "minilm-l6:3", "smollm2-135m:2,4,2.5", "whisper-tiny.en:2,4")


def _calibration(name: str, kind: str, tok: Any, n: int, seq: int) -> list[Any]:
    """Calibration batches from the calibration split only (news text; speech *train* utterances)."""
    from benchmarks import data

    if kind != "speech-seq2seq":
        return data.calibration_batches(tok, n_samples=n, seq_len=seq)
    utts = next(iter(data.speech_set().values()))["train"][:n]
    return data.speech_calibration_batches(tok, utts, seq)


def _bits(model: torch.nn.Module) -> dict[str, float]:
    """Stored bits of every CodebookLinear (indices, permutation, fp16 codebooks and scales) per weight."""
    from hf_compress.layers.codebook import CodebookLinear
    from hf_compress.methods.jlcm import layer_bits

    total, weights, index = 0, 0, 0
    for m in model.modules():
        if isinstance(m, CodebookLinear):
            b = layer_bits(m)
            total += sum(b.values())
            index += b["indices"]
            weights += m.in_features * m.out_features
    return {"bpw_index": index / weights, "bpw_effective": total / weights, "quantized_weights": weights}


def _layer_loss(model: torch.nn.Module, dense: torch.nn.Module, sigmas: dict[str, torch.Tensor]) -> float:
    """Mean over layers of ``tr(EΣEᵀ) / tr(WΣWᵀ)`` (relative output reconstruction error on calibration inputs)."""
    from hf_compress.layers.common import linear_weight_and_bias

    vals = []
    for name, sig in sigmas.items():
        w = linear_weight_and_bias(dense.get_submodule(name))[0].detach().float()
        e = model.get_submodule(name).weight.detach().float() - w
        vals.append(float((e * (e @ sig)).sum() / (w * (w @ sig)).sum()))
    return sum(vals) / len(vals)


def _fp16_disk(model: torch.nn.Module) -> int:
    from benchmarks import metrics

    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).half().save_pretrained(tmp)
        return metrics.disk_bytes(tmp)["weights"]


def _model_state(name: str, args: argparse.Namespace, bench: Any, states: dict[str, dict]) -> dict[str, Any]:
    """Load ``name`` once: dense model, tokenizer, dense record (measured and saved) and calibration covariances."""
    if name in states:
        return states[name]
    from benchmarks import harness, zoo
    from hf_compress.calibration import input_covariances
    from hf_compress.compress import find_targets
    from hf_compress.methods.jlcm import CodebookConfig

    kind = zoo.ZOO[name].kind
    dense_model, tok = zoo.load(name)
    print(f"[jlcm] {name}: dense", flush=True)
    dense = bench.record(name, "dense", quality=_quality(dense_model, tok, kind, args),
                         size={**harness.size(dense_model), "disk_bytes_fp16": _fp16_disk(dense_model)},
                         latency=harness.latency(dense_model, kind, args.budget))
    bench.save(args.out)
    names = list(find_targets(dense_model, _plan(MODELS[name], CodebookConfig(bits=3, method="rtn"))))
    calib = _calibration(name, kind, tok, args.calib_samples, args.calib_len)
    t0 = time.perf_counter()
    sigmas = {n: s.float() for n, s in input_covariances(dense_model, names, calib).items()}
    states[name] = {"kind": kind, "dense_model": dense_model, "tok": tok, "dense": dense, "calib": calib,
                    "sigmas": sigmas, "calib_s": time.perf_counter() - t0}
    return states[name]


def run_model(name: str, bits: list[float], methods: list[str], args: argparse.Namespace, bench: Any,
              states: dict[str, dict]) -> None:
    import hf_compress
    from hf_compress.methods.jlcm import CALIBRATED, CodebookConfig, reuse_covariances

    st = _model_state(name, args, bench, states)
    dense_model, sigmas, calib_s = st["dense_model"], st["sigmas"], st["calib_s"]
    pattern = MODELS[name]
    for bpw in bits:
        # a calibrated method once per --calibration-order; rtn/kmeans never calibrate, so once
        runs = [(m, o == "sequential") for m in methods
                for o in (dict.fromkeys(args.calibration_order) if m in CALIBRATED else ["dense"])]
        for method, sequential in runs:
            cfg = CodebookConfig(bits_per_weight=bpw, method=method, steps=args.steps, kmeans_iters=args.kmeans_iters,
                                 block_size=args.block_size or None, group_size=args.group_size,
                                 vector_dim=args.vector_dim,
                                 error_feedback=args.error_feedback, sequential=sequential)
            label = f"{method}-seq" if sequential else method
            print(f"[jlcm] {name}: {label} {bpw} bits/weight", flush=True)
            model = copy.deepcopy(dense_model)
            t0 = time.perf_counter()
            with reuse_covariances(sigmas):  # sequential configs ignore these and calibrate block by block
                hf_compress.compress(model, _plan(pattern, cfg), calibration=st["calib"] if sequential else None,
                                     progress=False)
            compress_s = time.perf_counter() - t0 + (calib_s if method in CALIBRATED and not sequential else 0)
            extra: dict[str, Any] = {"compress_s": compress_s, "layer_loss": _layer_loss(model, dense_model, sigmas),
                                     **_bits(model)}
            _measure(name, label, bpw, cfg, model, extra, st, args, bench)
            if method in args.finetune_methods and args.finetune_seconds > 0:
                _finetune(name, label, bpw, cfg, model, extra, st, args, bench)
            del model
            gc.collect()


def _measure(name: str, method: str, bpw: float, cfg: Any, model: torch.nn.Module, extra: dict[str, Any],
             st: dict[str, Any], args: argparse.Namespace, bench: Any) -> None:
    """Latency (JLCM rows), bytes on disk, reload check and quality of one compressed ``model``; one record."""
    from benchmarks import harness, metrics
    from benchmarks.runner import _reload_class

    kind, dense_model, tok, dense, calib = st["kind"], st["dense_model"], st["tok"], st["dense"], st["calib"]
    lat: dict[str, Any] = {}
    if method.startswith("jlcm") or args.all_latency:  # dense measured right beside it: the CPU is shared
        extra["dense_forward_s_now"] = harness.latency(dense_model, kind, args.budget)["forward_s"]
        lat = harness.latency(model, kind, args.budget)
        extra["latency_ratio_vs_dense_now"] = lat["forward_s"] / extra["dense_forward_s_now"]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        disk = metrics.disk_bytes(tmp)["weights"]
        if method.startswith("jlcm"):
            extra["reload_identical"] = _reload_identical(model, _reload_class(kind).from_pretrained(tmp),
                                                          calib[0])
    if method == "jlcm" and not st.get("lookup_done"):
        st["lookup_done"] = True
        extra["latency_lookup_mode"] = _lookup_latency(model, kind, args.budget)
    disk16 = _fp16_disk(model)  # the rest of the model (embeddings, norms, biases) in fp16 too
    size = {"params": metrics.param_count(model), "disk_bytes": disk, "disk_bytes_fp16": disk16,
            "disk_fp16_vs_dense_fp16": disk16 / dense["size"]["disk_bytes_fp16"],
            "quantized_linears_bytes": extra["bpw_effective"] * extra["quantized_weights"] / 8,
            "quantized_linears_fp16_bytes": 2 * extra["quantized_weights"]}
    bench.record(name, method, setting={"bits_per_weight": bpw, **cfg.to_dict()},
                 quality=_quality(model, tok, kind, args), size=size, latency=lat,
                 extra=extra, dense=dense)
    bench.save(args.out)


def _finetune(name: str, method: str, bpw: float, cfg: Any, model: torch.nn.Module, extra: dict[str, Any],
              st: dict[str, Any], args: argparse.Namespace, bench: Any) -> None:
    """Distill ``model`` (codebooks, scales/offsets, norms, biases trainable; indices fixed) toward the dense model
    on calibration-split windows for ``--finetune-seconds``; recorded as ``<method>+ft``."""
    from benchmarks import data
    from hf_compress.healing import distill_logits
    from hf_compress.methods.jlcm import freeze_codebooks, mark_codebooks_trainable

    if st["kind"] == "causal-lm":
        batches = data.calibration_batches(st["tok"], n_samples=args.finetune_samples, seq_len=args.calib_len, seed=1)
    elif st["kind"] == "speech-seq2seq":  # train utterances of every voice with their transcripts (test unheard)
        utts = [u for s in data.speech_set().values() for u in s["train"]][: args.finetune_samples]
        batches = data.speech_calibration_batches(st["tok"], utts, args.calib_len)
    else:
        print(f"[jlcm] {name}: fine-tuning needs output logits (causal LM or Whisper); skipped", flush=True)
        return
    print(f"[jlcm] {name}: {method} {bpw} bits/weight + distillation fine-tuning", flush=True)
    mark_codebooks_trainable(model)
    stats = distill_logits(model, st["dense_model"], batches, max_steps=100_000, max_seconds=args.finetune_seconds,
                           batch_size=args.finetune_batch, learning_rate=args.finetune_lr)
    freeze_codebooks(model)
    keep = ("compress_s", "bpw_index", "bpw_effective", "quantized_weights")
    extra = {**{k: extra[k] for k in keep}, "finetune": stats, "layer_loss": _layer_loss(model, st["dense_model"],
                                                                                         st["sigmas"]),
             "layer_loss_before_finetune": extra["layer_loss"],
             "compress_s_with_finetune": extra["compress_s"] + stats["seconds"]}
    _measure(name, f"{method}+ft", bpw, cfg, model, extra, st, args, bench)


def _quality(model: torch.nn.Module, tok: Any, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import harness

    voices = tuple(args.voices) if args.voices and kind == "speech-seq2seq" else None
    return harness.quality(model, tok, kind, args.budget, voices=voices)


def _plan(pattern: str, cfg: Any) -> Any:
    from hf_compress import CompressionConfig

    return CompressionConfig(modules={pattern: cfg})


def _reload_identical(model: torch.nn.Module, again: torch.nn.Module, batch: Any) -> bool:
    inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
    with torch.no_grad():
        a, b = model(**inputs), again(**inputs)
    key = "logits" if getattr(a, "logits", None) is not None else "last_hidden_state"
    return bool(torch.equal(getattr(a, key), getattr(b, key)))


def _lookup_latency(model: torch.nn.Module, kind: str, budget: str) -> dict[str, float]:
    """Forward latency with every CodebookLinear decoding its weight per call (``mode="lookup"``)."""
    from benchmarks import harness
    from hf_compress.layers.codebook import CodebookLinear

    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    for m in layers:
        m.mode, m._weight_cache = "lookup", None
    gc.collect()
    try:
        return {"forward_s": harness.latency(model, kind, budget)["forward_s"]}
    finally:
        for m in layers:
            m.mode = "cached"


def main(argv: list[str]) -> int:
    from benchmarks.harness import Bench

    parser = argparse.ArgumentParser(prog="python -m benchmarks suite jlcm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", nargs="+", default=list(SCHEDULE),
                        help="model:bits,bits,... phases in run order (models are loaded and calibrated once)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budget", default="default", choices=["default", "quick"])
    parser.add_argument("--steps", type=int, default=6, help="JLCM joint optimization steps per layer")
    parser.add_argument("--kmeans-iters", type=int, default=10)
    parser.add_argument("--error-feedback", type=int, default=1, help="JLCM GPTQ-style error-feedback rounds")
    parser.add_argument("--block-size", type=int, default=192, help="input columns per scale/offset block (0: none)")
    parser.add_argument("--calibration-order", nargs="+", default=["dense"], choices=["dense", "sequential"],
                        help="jlcm/gptq: 'dense' calibrates every layer on the dense model; 'sequential' each block "
                        "on the already compressed blocks before it (CodebookConfig(sequential=True), rows "
                        "'<method>-seq'); both: one row of each")
    parser.add_argument("--group-size", type=int, default=32, help="rows per codebook (neuron group)")
    parser.add_argument("--vector-dim", type=int, default=1,
                        help="weights per codeword (1: scalar codebooks; 2 at 3 bits/weight: 6-bit indices into "
                             "64 two-dimensional codewords)")
    parser.add_argument("--wer-utterances", type=int, default=None,
                        help="override the budget's test utterances per voice for Whisper")
    parser.add_argument("--voices", nargs="+", default=None, help="Whisper test voices (default: all)")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--finetune-seconds", type=float, default=0.0,
                        help="after each --finetune-methods row of a causal LM or Whisper: distill its codebooks, "
                             "scales, norms and biases toward the dense model (hf_compress.healing.distill_logits, "
                             "indices fixed) for this wall time and record '<method>+ft'; 0 = off")
    parser.add_argument("--finetune-methods", nargs="+", default=["jlcm"], choices=list(METHODS))
    parser.add_argument("--finetune-samples", type=int, default=256,
                        help="calibration-split windows (--calib-len tokens, seed 1) to distill on")
    parser.add_argument("--finetune-batch", type=int, default=4)
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 while other benchmarks share the CPU)")
    parser.add_argument("--all-latency", action="store_true", help="measure latency for every method, not only JLCM")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/jlcm.json)")
    args = parser.parse_args(argv)
    if args.wer_utterances:  # a derived, stated budget: same as --budget except the WER utterances per voice
        from benchmarks import harness

        derived = f"{args.budget}+wer{args.wer_utterances}"
        harness.BUDGETS[derived] = {**harness.BUDGETS[args.budget], "wer_utterances": args.wer_utterances}
        args.budget = derived
    phases = []
    for item in args.schedule:
        name, _, bits = item.partition(":")
        if name not in MODELS or not bits:
            raise SystemExit(f"jlcm suite: bad --schedule item {item!r}; use model:bits[,bits] with model in "
                             f"{list(MODELS)}")
        phases.append((name, [float(b) for b in bits.split(",")]))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bench = Bench("jlcm", budget=args.budget, description=(
        f"JLCM vs RTN vs k-means codebooks vs GPTQ (error feedback onto the RTN grid) on all block linear layers; "
        f"steps={args.steps}, error_feedback={args.error_feedback}, kmeans_iters={args.kmeans_iters}, "
        f"calibration {args.calib_samples}x{args.calib_len} (news text / speech train split); "
        f"codebook per {args.group_size} similar rows, {args.vector_dim} weight(s) per codeword, "
        f"fp16 scale+offset per (row, {args.block_size} input columns)"
        " (rtn = asymmetric round-to-nearest with that group). SmolLM2 weights are dequantized Q4_1 (4-bit grid "
        f"per 32-input block); a {args.block_size}-column block spans several Q4_1 blocks, so 4 bits is not "
        "lossless. bits_per_weight counts index bits; extra.bpw_effective adds fp16 codebooks, scales, offsets and "
        "the row permutation." + (" Rows '<method>-seq': jlcm/gptq calibrated block by block on the partly "
                                  "compressed model (sequential=True); their layer_loss is still on dense inputs."
                                  if "sequential" in args.calibration_order else "")
        + f" Schedule: {' '.join(args.schedule)}; {args.threads} torch thread(s)." + (
            f" Rows '<method>+ft': that model after {args.finetune_seconds:.0f} s of distillation from the dense "
            f"model (KL on {args.finetune_samples} calibration-split windows, or for Whisper as many speech train "
            f"utterances with their transcripts, batch {args.finetune_batch}, AdamW lr "
            f"{args.finetune_lr}) of codebooks, scales/offsets, norms and biases; "
            "indices fixed, same bytes." if args.finetune_seconds > 0 else "")))
    states: dict[str, dict] = {}
    for name, bits in phases:
        try:
            run_model(name, bits, args.methods, args, bench, states)
        except Exception as err:  # one model failing (e.g. Whisper zoo entry unfinished) must not lose the rest
            print(f"[jlcm] {name} skipped: {type(err).__name__}: {err}", flush=True)
            bench.record(name, "skipped", setting={"bits": bits}, extra={"error": f"{type(err).__name__}: {err}"})
        bench.save(args.out)
    print(bench.save(args.out))
    return 0
