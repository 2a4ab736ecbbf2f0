"""Subspace embeddings (Jaiswal & Liu, CIKM'23) on real checkpoints: ``python -m benchmarks suite subspace``.

MiniLM-L6: Lee50 / polarity / WordSim353 (+ SimLex999) for dense, modulo and context assignment at f = 2 and 3,
training-free and after distillation, all in one run. Causal LMs (SmolLM2-135M, optionally Gemma-3-270M):
perplexity of one setting, training-free and distilled. Every setting is saved, reloaded with plain transformers
and compared bit for bit; lookup latency and tied-head latency (factored vs materialized ``[V, d]``) are timed.
Distillation uses the calibration text (news) plus, for the encoder, vocabulary tokens shown one at a time
(``distill(isolated_tokens=...)``: uniform over the whole vocabulary, not the evaluation words); evaluation uses
other text (Lee50 docs, Wikipedia, word lists). ``embedding_bytes_removed`` counts the stored (bit-packed) codes
too, ``embedding_params_removed`` only the trainable tables (the paper's measure).
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


@torch.no_grad()
def paired_lookup(vocab: int, dim: int, rows: int, f: int, tokens: int = 4096, rounds: int = 15) -> dict[str, Any]:
    """Lookup seconds of a dense ``nn.Embedding [V, d]`` and a context :class:`SubspaceEmbedding` of the same
    shape (``f`` tables of ``rows`` rows, random distinct codes), timed **interleaved** (lookup cost depends on
    shapes and dtypes, not on the values). Ids ``[8, tokens/8]``; medians over ``rounds``."""
    from hf_compress.layers.subspace import SubspaceEmbedding, split_widths

    g = torch.Generator().manual_seed(0)
    dense = torch.nn.Embedding(vocab, dim)
    sub = SubspaceEmbedding(vocab, dim, rows, widths=split_widths(dim, f), assignment="context")
    sub.set_codes(torch.randint(0, rows, (vocab, f), generator=g))
    ids = torch.randint(0, vocab, (8, tokens // 8), generator=g)
    times: dict[str, list[float]] = {"dense": [], "subspace": []}
    for layer in (dense, sub):
        layer(ids)
    for _ in range(rounds):
        for name, layer in (("dense", dense), ("subspace", sub)):
            t = time.perf_counter()
            layer(ids)
            times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"dense_lookup_s": med["dense"], "subspace_lookup_s": med["subspace"],
            "lookup_ratio": med["subspace"] / med["dense"], "shape": [vocab, dim], "num_rows": rows,
            "num_subspaces": f, "tokens": tokens, "rounds": rounds}


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
    extra = {**extra, "eval_s": round(time.time() - t, 1), "budget": budget}
    if dense is not None:
        extra["reload_exact"] = reload_exact(model, kind)
        extra["embedding_params_removed"] = 1 - size[f"params_{emb_name}"] / dense["size"][f"params_{emb_name}"]
        extra["embedding_bytes_removed"] = 1 - size["bytes_embedding"] / dense["size"]["bytes_embedding"]  # + codes
        if kind == "encoder":
            drops = {k: dense["quality"][k] - quality[k] for k in SCORES}
            extra["drop_points"] = {k: round(100 * v, 2) for k, v in drops.items()}
            extra["goal_met"] = extra["embedding_params_removed"] >= 0.99 and max(drops.values()) <= 0.04
            # the same goal on stored bytes: the bit-packed codes count too (they grow with f)
            extra["goal_met_bytes"] = extra["embedding_bytes_removed"] >= 0.99 and max(drops.values()) <= 0.04
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
    bench.save(args.out)
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
        paired = paired_lookup(emb.num_embeddings, emb.embedding_dim, emb.num_rows, f) if assignment == "context" \
            else None  # interleaved with a dense table of the same shape (less noisy than lookup_s ratios)
        measure(bench, name, student, tok, kind, f"{assignment}-f{f}-init", setting, dense, args.budget,
                {"compress_s": compress_s, "distilled": False, "paired_lookup": paired})
        bench.save(args.out)  # a cut-off run keeps the training-free row
        if steps > 0:
            isolated = args.lm_isolated_tokens if lm else args.isolated_tokens
            info = distill(student, model, batches, steps=steps, lr=args.lm_lr if lm else args.lr,
                           batch_size=args.lm_batch if lm else args.batch, progress=not args.no_progress,
                           isolated_tokens=isolated, tokenizer=tok)
            measure(bench, name, student, tok, kind, f"{assignment}-f{f}-distilled",
                    {**setting, "steps": steps, "lr": args.lm_lr if lm else args.lr, "isolated_tokens": isolated},
                    dense, args.budget,
                    {"compress_s": compress_s, "distilled": True, "distill": info})
        bench.save(args.out)
        del student


def _parse(items: list[str]) -> list[tuple[int, str]]:
    """``["8:context"]`` -> ``[(8, "context")]``."""
    return [(int(item.split(":")[0]), item.split(":")[1]) for item in items]


QUICK = {"samples": 16, "steps": 10, "lm_samples": 4, "lm_steps": 4, "lm_seq": 128}  # unless given explicitly


def _save(save: Any, path: Path, kept: dict[str, Any] | None) -> Path:
    """``save(path)`` (``Bench.save``); with ``kept`` (the document the kept records came from), the budgets
    and wall times of both runs are listed."""
    out = save(path)
    if kept is not None:
        doc = json.loads(out.read_text())
        doc["budget"] = {**kept.get("budget", {}), **doc["budget"]}
        doc["wall_s"] = {"kept_records": kept.get("wall_s"), "this_run": doc["wall_s"]}
        out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks suite subspace", description=__doc__)
    parser.add_argument("--budget", default="default", choices=list(harness.BUDGETS))
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"], choices=list(EMBED))
    parser.add_argument("--fraction", type=float, default=0.01, help="encoder: n = fraction * V (1%% of params)")
    parser.add_argument("--extra-settings", nargs="*", default=["8:context", "32:context", "48:context",
                                                                 "48:modulo"],
                        help="encoder f:assignment beyond the f = 2, 3 grid (at a fixed n, larger f = more code "
                        "bits per token, same parameters; the stored codes grow with f: see bytes_embedding)")
    parser.add_argument("--encoder-settings", nargs="+", default=None, metavar="F:ASSIGNMENT",
                        help="MiniLM: run only these settings instead of the f = 2, 3 grid + --extra-settings")
    parser.add_argument("--lm-fraction", type=float, default=0.05, help="causal LMs: n = fraction * V")
    parser.add_argument("--lm-settings", nargs="+", default=["8:context"], help="f:assignment for causal LMs")
    parser.add_argument("--samples", type=int, default=None, help="encoder calibration windows (128; quick 16)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="encoder distillation steps (200; quick 10; 0: none)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--isolated-tokens", type=int, default=256, help="encoder: vocabulary tokens per step "
                        "distilled one at a time ([CLS] t [SEP]; see subspace.distill); 0: text only")
    parser.add_argument("--lm-isolated-tokens", type=int, default=0, help="causal LMs: the same (default off)")
    parser.add_argument("--lm-samples", type=int, default=None, help="causal-LM calibration windows (48; quick 4)")
    parser.add_argument("--lm-seq", type=int, default=None, help="(128)")
    parser.add_argument("--lm-steps", type=int, default=None, help="causal-LM distillation steps (12; quick 4)")
    parser.add_argument("--lm-batch", type=int, default=2)
    parser.add_argument("--lm-lr", type=float, default=1e-3)
    parser.add_argument("--kmeans-iters", type=int, default=15)
    parser.add_argument("--lm-kmeans-iters", type=int, default=4)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/subspace.json)")
    parser.add_argument("--append", action="store_true", help="keep the records of other models already in the "
                        "results JSON (their budget is listed next to this run's)")
    parser.add_argument("--paired-lookup-only", action="store_true", help="only time dense vs subspace lookup "
                        "interleaved (shape-matched layers, --lm-settings/--lm-fraction) for each --models entry")
    parser.add_argument("--note", default="", help="appended to the description (which run made which rows)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # shared CPUs: oversubscribed OpenMP threads are far slower than one
    full = {"samples": 128, "steps": 200, "lm_samples": 48, "lm_steps": 12, "lm_seq": 128}
    for key, value in (QUICK if args.budget == "quick" else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    path = Path(args.out) if args.out else harness.RESULTS_DIR / "subspace.json"
    kept = json.loads(path.read_text()) if args.append and path.exists() else None
    description = kept["description"] if kept else __doc__.splitlines()[0]
    bench = harness.Bench("subspace", budget=args.budget, description=f"{description} {args.note}".strip())
    if kept:
        bench.records = [r for r in kept["records"] if args.paired_lookup_only or r["model"] not in args.models]
    plain_save = bench.save
    bench.save = lambda out=None: _save(plain_save, path, kept)  # type: ignore[method-assign]
    for name in args.models if args.paired_lookup_only else []:
        cfg = json.loads((Path(zoo.resolve(name)) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        vocab, dim = cfg["vocab_size"], cfg["hidden_size"]
        fraction = args.fraction if name == "minilm-l6" else args.lm_fraction
        for f, _ in _parse(args.lm_settings):  # stored codes (context); modulo computes its codes instead
            rows = max(1, int(fraction * vocab))
            res = paired_lookup(vocab, dim, rows, f)
            bench.record(name, f"lookup-paired-context-f{f}", {"num_subspaces": f, "num_rows": rows,
                                                                "param_fraction": fraction},
                         latency={"lookup_s": res["subspace_lookup_s"], "dense_lookup_s": res["dense_lookup_s"]},
                         extra={**res, "budget": args.budget, "note": "interleaved lookup timing of shape-matched "
                                "layers (random codes; lookup cost does not depend on values)"})
            print(f"[subspace] {name} paired lookup {res}", flush=True)
            bench.save(args.out)
    for name in [] if args.paired_lookup_only else args.models:
        if name == "minilm-l6":
            settings = (_parse(args.encoder_settings) if args.encoder_settings else
                        [(f, a) for f in (2, 3) for a in ("modulo", "context")] + _parse(args.extra_settings))
        else:
            settings = _parse(args.lm_settings)
        run_model(bench, name, settings, args)
    print(bench.save(args.out))
    return 0
