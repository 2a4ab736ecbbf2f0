"""Subspace embeddings (Jaiswal & Liu, CIKM'23) on real checkpoints: ``python -m benchmarks suite subspace``.

MiniLM-L6: Lee50 / polarity / WordSim353 (+ SimLex999) for dense, modulo and context assignment at f = 2 and 3,
training-free and after distillation, all in one run. Causal LMs (SmolLM2-135M, optionally Gemma-3-270M):
perplexity of one setting, training-free and distilled. Every setting is saved, reloaded with plain transformers
and compared bit for bit; lookup latency and tied-head latency (factored vs materialized ``[V, d]``) are timed.
Distillation uses the calibration text (news), evaluation uses other text (Lee50 docs, Wikipedia, word lists).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import data, harness, zoo

SCORES = ("lee50_spearman", "polarity_accuracy", "wordsim353_spearman")
EMBED = {"minilm-l6": "embeddings.word_embeddings", "smollm2-135m": "model.embed_tokens",
         "gemma3-270m": "model.embed_tokens"}


def _median_s(fn: Any, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def lookup_latency(model: Any, name: str, tokens: int = 4096) -> float:
    """Median seconds of one embedding lookup of ``tokens`` random ids ``[8, tokens/8]``."""
    emb = model.get_submodule(name)
    ids = torch.randint(0, emb.num_embeddings, (8, tokens // 8), generator=torch.Generator().manual_seed(0))
    return _median_s(lambda: emb(ids))


@torch.no_grad()
def head_latency(model: Any, rows: int) -> dict[str, float]:
    """Tied-head seconds for ``hidden [1, rows, d]``: factored and materialized (compressed), or dense."""
    head = model.get_output_embeddings()
    emb = getattr(head, "embedding", None) if "Tied" in type(head).__name__ else None
    h = torch.randn(1, rows, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    if emb is None:
        return {f"head_dense_{rows}_s": _median_s(lambda: head(h))}
    out = {f"head_factored_{rows}_s": _median_s(lambda: head(h))}
    emb.factored_logits = False
    out[f"head_materialized_{rows}_s"] = _median_s(lambda: head(h))
    emb.factored_logits = True
    return out


def calibration(tok: Any, n_samples: int, seq_len: int) -> list[torch.Tensor]:
    """News-text windows ``[1, seq_len]``; encoders get ``[CLS] … [SEP]`` like their inputs at evaluation."""
    cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    if cls is None or sep is None:
        return data.calibration_batches(tok, n_samples, seq_len)
    body = data.calibration_batches(tok, n_samples, seq_len - 2)
    return [torch.cat([torch.tensor([[cls]]), b, torch.tensor([[sep]])], 1) for b in body]


@torch.no_grad()
def reload_exact(model: Any, kind: str) -> bool:
    """Save, reload with plain transformers Auto classes, compare outputs on a probe bit for bit."""
    import transformers

    auto = transformers.AutoModel if kind == "encoder" else transformers.AutoModelForCausalLM
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        again = auto.from_pretrained(tmp).eval()
        a, b = model(input_ids=ids), again(input_ids=ids)
    key = "last_hidden_state" if kind == "encoder" else "logits"
    return bool(torch.equal(getattr(a, key), getattr(b, key)))


def measure(bench: harness.Bench, name: str, model: Any, tok: Any, kind: str, method: str, setting: dict,
            dense: dict | None, budget: str, extra: dict) -> dict[str, Any]:
    """Quality, size, latency (+ lookup/head timing, reload check) of one setting -> one record."""
    emb_name = EMBED[name]
    t = time.time()
    quality = harness.quality(model, tok, kind=kind, budget=budget)
    size = harness.size(model, embedding_names=(emb_name,))
    emb = model.get_submodule(emb_name)
    size["bytes_embedding"] = sum(x.numel() * x.element_size() for x in [*emb.parameters(), *emb.buffers()])
    latency = harness.latency(model, kind=kind, budget=budget) if kind != "encoder" else {}
    latency["lookup_s"] = lookup_latency(model, emb_name)
    if kind == "causal-lm":
        for rows in (1, 256):
            latency.update(head_latency(model, rows))
    extra = {**extra, "eval_s": round(time.time() - t, 1)}
    if dense is not None:
        extra["reload_exact"] = reload_exact(model, kind)
        extra["embedding_params_removed"] = 1 - size[f"params_{emb_name}"] / dense["size"][f"params_{emb_name}"]
        if kind == "encoder":
            drops = {k: dense["quality"][k] - quality[k] for k in SCORES}
            extra["drop_points"] = {k: round(100 * v, 2) for k, v in drops.items()}
            extra["goal_met"] = extra["embedding_params_removed"] >= 0.99 and max(drops.values()) <= 0.04
    rec = bench.record(name, method, setting, quality, size, latency, extra, dense=dense)
    print(f"[subspace] {name} {method} {setting} quality={quality} extra={extra}", flush=True)
    return rec


def run_model(bench: harness.Bench, name: str, settings: list[tuple[int, str]], args: argparse.Namespace) -> None:
    """Dense, then each ``(f, assignment)`` training-free and distilled, on zoo model ``name``."""
    from hf_compress import CompressionConfig, compress
    from hf_compress.methods.subspace import SubspaceEmbeddingConfig, distill

    model, tok = zoo.load(name)
    kind = harness.model_kind(model)
    emb_name = EMBED[name].rsplit(".", 1)[-1]
    dense = measure(bench, name, model, tok, kind, "dense", {}, None, args.budget, {})
    lm = kind == "causal-lm"
    batches = calibration(tok, args.lm_samples if lm else args.samples, args.lm_seq if lm else args.seq)
    steps = args.lm_steps if lm else args.steps
    fraction = args.lm_fraction if lm else args.fraction
    for f, assignment in settings:
        cfg = SubspaceEmbeddingConfig(num_subspaces=f, assignment=assignment, param_fraction=fraction,
                                      kmeans_iters=args.lm_kmeans_iters if lm else args.kmeans_iters)
        student = copy.deepcopy(model)
        t = time.time()
        compress(student, CompressionConfig(modules={emb_name: cfg}), calibration=batches, progress=False)
        compress_s = round(time.time() - t, 1)
        emb = student.get_submodule(EMBED[name])
        setting = {"num_subspaces": f, "assignment": assignment, "num_rows": emb.num_rows, "param_fraction": fraction}
        measure(bench, name, student, tok, kind, f"{assignment}-f{f}-init", setting, dense, args.budget,
                {"compress_s": compress_s, "distilled": False})
        if steps > 0:
            info = distill(student, model, batches, steps=steps, lr=args.lm_lr if lm else args.lr,
                           batch_size=args.lm_batch if lm else args.batch, progress=not args.no_progress)
            measure(bench, name, student, tok, kind, f"{assignment}-f{f}-distilled",
                    {**setting, "steps": steps, "lr": args.lm_lr if lm else args.lr}, dense, args.budget,
                    {"compress_s": compress_s, "distilled": True, "distill": info})
        bench.save(args.out)
        del student


def _parse(items: list[str]) -> list[tuple[int, str]]:
    """``["8:context"]`` -> ``[(8, "context")]``."""
    return [(int(item.split(":")[0]), item.split(":")[1]) for item in items]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks suite subspace", description=__doc__)
    parser.add_argument("--budget", default="default", choices=list(harness.BUDGETS))
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"], choices=list(EMBED))
    parser.add_argument("--fraction", type=float, default=0.01, help="encoder: n = fraction * V (1%% of params)")
    parser.add_argument("--extra-settings", nargs="*", default=["8:context"], help="encoder f:assignment beyond "
                        "the f = 2, 3 grid")
    parser.add_argument("--lm-fraction", type=float, default=0.05, help="causal LMs: n = fraction * V")
    parser.add_argument("--lm-settings", nargs="+", default=["8:context"], help="f:assignment for causal LMs")
    parser.add_argument("--samples", type=int, default=128, help="encoder calibration windows")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=80, help="encoder distillation steps (0: none)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lm-samples", type=int, default=48)
    parser.add_argument("--lm-seq", type=int, default=128)
    parser.add_argument("--lm-steps", type=int, default=12)
    parser.add_argument("--lm-batch", type=int, default=2)
    parser.add_argument("--lm-lr", type=float, default=1e-3)
    parser.add_argument("--kmeans-iters", type=int, default=15)
    parser.add_argument("--lm-kmeans-iters", type=int, default=4)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/subspace.json)")
    parser.add_argument("--append", action="store_true", help="keep the records already in the results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # shared CPUs: oversubscribed OpenMP threads are far slower than one
    if args.budget == "quick":
        args.samples, args.steps, args.lm_samples, args.lm_steps, args.lm_seq = 16, 10, 4, 4, 128
    bench = harness.Bench("subspace", budget=args.budget, description=__doc__.splitlines()[0])
    path = Path(args.out) if args.out else harness.RESULTS_DIR / "subspace.json"
    if args.append and path.exists():
        bench.records = [r for r in json.loads(path.read_text())["records"] if r["model"] not in args.models]
    for name in args.models:
        if name == "minilm-l6":
            settings = [(f, a) for f in (2, 3) for a in ("modulo", "context")] + _parse(args.extra_settings)
        else:
            settings = _parse(args.lm_settings)
        run_model(bench, name, settings, args)
    print(bench.save(args.out))
    return 0
