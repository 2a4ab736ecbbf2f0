"""Tensor-train embeddings (issue #4): dense vs per-token TT (paper), adaptive TT (ours), whole-matrix SVD.

``python -m benchmarks suite tt_embedding [--models ...] [--budget quick] [--wer-utterances N]``

Per model, in one run: the dense model, then every (format, compression) setting compresses only the token
embedding (tied heads read the compressed table, ``tied_head="compressed"``; one extra ``tied_head="dense"`` row at
2x for tied models). Recorded: embedding relative reconstruction error, TT-SVD time, quality (perplexity / encoder
scores / WER via ``harness.quality``), params and disk bytes, embedding lookup latency (8 x 512 ids) vs dense,
forward latency and decode tokens/s. Token frequencies for the adaptive format come from the calibration text only.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from typing import Any

import torch

from .. import data, harness, zoo

MODELS = ["smollm2-135m", "gemma3-270m", "minilm-l6", "whisper-tiny.en"]
RATIOS = {"default": [1.5, 2.0, 3.0], "quick": [2.0]}
FORMATS = ["per_token", "adaptive", "svd"]
EXTRA = [("tt_matrix", 2.0, "compressed"), ("adaptive", 2.0, "dense")]  # (format, ratio, tied_head)


def embedding_name(model: Any) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)


@torch.inference_mode()
def lookup_latency(module: Any, vocab: int, repeats: int = 7) -> float:
    """Median seconds of one embedding lookup of a fixed ``[8, 512]`` batch of ids."""
    ids = torch.randint(0, vocab, (8, 512), generator=torch.Generator().manual_seed(0))
    module(ids)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: Any, tok: Any, kind: str, budget: str, emb_name: str, voices: Any) -> dict[str, Any]:
    quality = harness.quality(model, tok, kind, budget=budget, voices=voices)
    size = harness.size(model, (emb_name,))
    latency = harness.latency(model, kind, budget=budget)
    latency["lookup_8x512_s"] = lookup_latency(model.get_submodule(emb_name), model.config.vocab_size)
    return {"quality": quality, "size": size, "latency": latency}


def run_model(bench: harness.Bench, name: str, budget: str, wer_utterances: int | None, out: str | None) -> None:
    from hf_compress import CompressionConfig, compress
    from hf_compress.methods.tt_embedding import TTEmbeddingConfig

    model, tok = zoo.load(name)
    kind = harness.model_kind(model)
    text_tok = getattr(tok, "tokenizer", tok)
    emb_name = embedding_name(model)
    weight = model.get_submodule(emb_name).weight.detach().clone()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight.data_ptr() == model.get_submodule(emb_name).weight.data_ptr()
    calibration = data.calibration_batches(text_tok, n_samples=128, seq_len=512)
    if wer_utterances is not None:
        harness.BUDGETS[budget]["wer_utterances"] = wer_utterances  # written into the JSON's "budget"
    voices = None
    print(f"[tt_embedding] {name}: {emb_name} {list(weight.shape)} tied={tied}", file=sys.stderr, flush=True)
    dense = measure(model, tok, kind, budget, emb_name, voices)
    dense_rec = bench.record(name, "dense", {"embedding": emb_name, "vocab": weight.shape[0], "dim": weight.shape[1],
                                             "tied": tied}, **dense)
    settings = [(f, r, "compressed") for f in FORMATS for r in RATIOS[budget]]
    settings += [(f, r, h) for f, r, h in EXTRA if (h == "compressed" or tied) and budget == "default"]
    for fmt, ratio, head in settings:
        m = copy.deepcopy(model)
        cfg = TTEmbeddingConfig(format=fmt, compression=ratio, tied_head=head)
        start = time.perf_counter()
        compress(m, CompressionConfig(modules={re.escape(emb_name) + "$": cfg}), calibration=calibration,
                 progress=False)
        seconds = time.perf_counter() - start
        layer = m.get_submodule(emb_name)
        with torch.no_grad():
            rel_err = float((layer.weight - weight).norm() / weight.norm())
        emb_params = sum(p.numel() for p in layer.parameters())
        got = measure(m, tok, kind, budget, emb_name, voices)
        rec = bench.record(name, f"tt_{fmt}" + ("" if head == "compressed" else "_densehead"),
                           {"format": fmt, "compression": ratio, "tied_head": head, "layer": layer.spec()},
                           extra={"embedding_rel_error": rel_err, "compress_s": seconds,
                                  "embedding_compression": weight.numel() / emb_params,
                                  "lookup_ratio_vs_dense": got["latency"]["lookup_8x512_s"]
                                  / dense["latency"]["lookup_8x512_s"]},
                           dense=dense_rec, **got)
        print(f"[tt_embedding] {name} {fmt} x{ratio} head={head}: err={rel_err:.3f} t={seconds:.1f}s "
              f"q={rec['quality']}", file=sys.stderr, flush=True)
        del m
        bench.save(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks suite tt_embedding", description=__doc__)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=list(zoo.ZOO))
    parser.add_argument("--budget", default="default", choices=list(harness.BUDGETS))
    parser.add_argument("--wer-utterances", type=int, default=None,
                        help="Whisper: test utterances per voice (default: the budget's; recorded in the JSON)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/tt_embedding.json)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bench = harness.Bench("tt_embedding", args.budget, description=__doc__.strip().splitlines()[0])
    out = args.out
    failed = []
    for name in args.models:
        try:
            run_model(bench, name, args.budget, args.wer_utterances, out)
        except Exception as err:
            failed.append(name)
            bench.record(name, "error", extra={"error": f"{type(err).__name__}: {err}"[:500]})
            print(f"[tt_embedding] {name} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        print(bench.save(out), flush=True)
    return 1 if failed else 0
