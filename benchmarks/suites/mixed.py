"""Mixed plans (``hf_compress.plan``) vs the single-method settings, on SmolLM2-135M and Whisper tiny.en.

``python -m benchmarks suite mixed [--models smollm2-135m whisper-tiny.en] [--fractions 0.6 0.3] [--budget quick]``;
``python -m benchmarks suite mixed merge A.json B.json`` merges per-model runs into ``results/mixed.json`` (+ PNGs).

Per model, in one process: the dense model; every single-method setting (one method on every module it applies
to: TT embeddings on the token embedding, whitened low-rank / codebooks on every block linear (JLCM layout; JLCM's
k-means init + one error-feedback mapping, no joint steps, as the planner's candidates), product twins on every
attention); then ``plan()`` measures per-group sensitivity once on held-out
calibration batches (calibration split only; news text / speech *train* utterances) and searches mixed plans for
size budgets: the bytes of each single-method setting (matched size) and ``--fractions`` of the dense bytes. Every
setting is then scored with the same benchmark metric (perplexity on the eval text / WER on the speech test split).

Size is ``size.bytes_fp16``: stored bytes with floating tensors counted at 2 bytes (the fp16 a checkpoint ships
in; packed indices at their width), tied weights once. The goal check (``extra.goal`` of each mixed record):
every single-method setting at least as good (quality <= the plan's) must be larger than the plan.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {"embedding": r"model\.embed_tokens", "linear": r"layers\.\d+\.(self_attn|mlp)\.\w+_proj$",
                     "attention": r"layers\.\d+\.self_attn$"},
    "whisper-tiny.en": {"embedding": r"decoder\.embed_tokens",
                        "linear": r"layers\.\d+\.(self_attn|encoder_attn)\.(q|k|v|out)_proj$|layers\.\d+\.fc(1|2)$",
                        "attention": r"layers\.\d+\.(self_attn|encoder_attn)$"},
}


def single_settings(name: str) -> list[tuple[str, str, Any]]:
    """``(method, setting label, CompressionConfig)`` of every single-method baseline of ``name``."""
    from hf_compress import CompressionConfig, LowRankConfig
    from hf_compress.methods.adaptwin import ProductTwinConfig
    from hf_compress.methods.jlcm import CodebookConfig
    from hf_compress.methods.tt_embedding import TTEmbeddingConfig

    p = MODELS[name]
    out = [("tt_embedding", f"adaptive x{c}", CompressionConfig(modules={p["embedding"]: TTEmbeddingConfig(
        format="adaptive", compression=c)})) for c in (1.5, 2.0, 4.0)]
    out += [("low_rank", f"whitened {r}", CompressionConfig(modules={p["linear"]: LowRankConfig(
        method="whitened", rank_ratio=r)})) for r in (0.75, 0.5)]
    out += [("jlcm", f"k-means + error feedback {b}b", CompressionConfig(modules={p["linear"]: CodebookConfig(
        bits=b, method="jlcm", steps=0, error_feedback=1, kmeans_iters=8)})) for b in (4, 3)]
    # the same codebooks on the token embedding too (a tied head reads that table; methods.jlcm_embedding)
    out += [("jlcm", f"k-means + error feedback {b}b, embedding too", CompressionConfig(modules={
        p[k]: CodebookConfig(bits=b, method="jlcm", steps=0, error_feedback=1, kmeans_iters=8)
        for k in ("linear", "embedding")})) for b in (4, 3)]
    out += [("product_twin", f"rank_ratio {r}", CompressionConfig(modules={p["attention"]: ProductTwinConfig(
        rank_ratio=r, whiten=True)})) for r in (0.75, 0.5)]
    return out


def _calibration(kind: str, tok: Any, n: int, seq: int) -> list[Any]:
    from benchmarks import data

    if kind != "speech-seq2seq":
        return data.calibration_batches(tok, n_samples=n, seq_len=seq)
    voices = list(data.speech_set().values())
    utts = [voices[i % len(voices)]["train"][i] for i in range(n)]
    return data.speech_calibration_batches(tok, utts, seq)


def _measure(model: Any, tok: Any, kind: str, args: argparse.Namespace) -> tuple[dict, dict]:
    from benchmarks import harness
    from hf_compress.planning import model_bytes

    quality = harness.quality(model, tok, kind, args.budget, voices=tuple(args.voices) if kind == "speech-seq2seq"
                              else None)
    size = harness.size(model)
    size["bytes_fp16"] = model_bytes(model, 2)
    return quality, size


def _goal(rec: dict[str, Any], singles: list[dict[str, Any]], metric: str, tolerance: float = 1.1) -> dict[str, Any]:
    """Met if some single setting has the *same* quality (at least as good, and within ``tolerance`` of the plan's)
    and every single setting at least as good is larger than the plan (lower is better for ppl and WER).
    ``pareto``: no single setting is both at least as good and no larger (``dominated_by`` empty), and the plan is
    better than some single setting at least as large (``dominates``): the check that still speaks when no single
    setting reaches the plan's quality at all (then ``met`` has no same-quality setting to compare with)."""
    q, b = rec["quality"][metric], rec["size"]["bytes_fp16"]
    rivals = [{"method": s["method"], "setting": s["setting"]["label"], metric: s["quality"][metric],
               "bytes_fp16": s["size"]["bytes_fp16"]} for s in singles if s["quality"][metric] <= q]
    same = [r for r in rivals if r[metric] * tolerance >= q]
    worse = [s for s in singles if s["quality"][metric] > q]
    dominated_by = [r for r in rivals if r["bytes_fp16"] <= b]
    dominates = [{"method": s["method"], "setting": s["setting"]["label"]} for s in worse
                 if s["size"]["bytes_fp16"] >= b]
    return {"singles_at_least_as_good": rivals, "singles_same_quality": same, "tolerance": tolerance,
            "dominated_by": dominated_by, "pareto": not dominated_by and bool(dominates),
            "met": bool(same) and all(r["bytes_fp16"] > b for r in rivals),
            "smallest_rival_bytes_ratio": min((b / r["bytes_fp16"] for r in rivals), default=None),
            "dominates": dominates,
            "singles_worse_but_smaller": [{"method": s["method"], "setting": s["setting"]["label"],
                                           "bytes_fp16": s["size"]["bytes_fp16"]} for s in worse
                                          if s["size"]["bytes_fp16"] < b]}


def run_model(name: str, args: argparse.Namespace, bench: Any) -> None:
    from benchmarks import harness, zoo
    from hf_compress import compress, plan

    model, tok = zoo.load(name)
    model.eval()
    kind = harness.model_kind(model)
    metric = harness.PRIMARY_METRIC[kind][0]
    cal = _calibration(kind, tok, args.calib_samples, args.calib_len)
    t0 = time.perf_counter()
    q, s = _measure(model, tok, kind, args)
    dense = bench.record(name, "dense", {"label": "dense"}, quality=q, size=s,
                         extra={"eval_s": round(time.perf_counter() - t0, 1)})
    bench.save(args.out)
    print(f"[mixed] {name} dense {metric}={q[metric]:.4g} bytes={s['bytes_fp16']}", flush=True)
    fit, held = cal[:-args.held_out], cal[-args.held_out:]
    singles = []
    for method, label, cfg in single_settings(name):
        if (args.methods and method not in args.methods) or f"{method}:{label}" in args.drop:
            continue
        t0 = time.perf_counter()
        m = copy.deepcopy(model).eval()
        compress(m, cfg, calibration=fit, progress=False)
        c_s = time.perf_counter() - t0
        q, s = _measure(m, tok, kind, args)
        singles.append(bench.record(name, method, {"label": label, "plan": cfg.to_dict()}, quality=q, size=s,
                                    dense=dense, extra={"compress_s": round(c_s, 1)}))
        bench.save(args.out)
        print(f"[mixed] {name} {method} {label}: {metric}={q[metric]:.4g} bytes={s['bytes_fp16']}", flush=True)
        del m
        gc.collect()
    budgets = [{"bytes": r["size"]["bytes_fp16"], "label": f"matched {r['method']} {r['setting']['label']}"}
               for r in singles if r["method"] in args.match and r["size"]["bytes_fp16"] < 0.97 * dense["size"][
                   "bytes_fp16"]]
    budgets += [{"bytes": f * dense["size"]["bytes_fp16"], "label": f"fraction {f}"} for f in args.fractions]
    previous = None
    for b in budgets:
        t0 = time.perf_counter()
        try:
            res = plan(model, {"bytes": int(b["bytes"])}, fit, eval_batches=held, keep_model=True, reuse=previous,
                       progress=False)
        except ValueError as err:
            bench.record(name, "mixed", {"label": b["label"], "budget_bytes": int(b["bytes"])},
                         extra={"error": str(err)})
            bench.save(args.out)
            print(f"[mixed] {name} {b['label']}: {err}", flush=True)
            continue
        plan_s = time.perf_counter() - t0
        previous = previous or res
        q, s = _measure(res.model, tok, kind, args)
        rec = bench.record(name, "mixed", {"label": b["label"], "budget_bytes": int(b["bytes"]),
                                           "plan": res.config.to_dict(), "chosen": res.chosen},
                           quality=q, size=s, dense=dense,
                           extra={"plan_s": round(plan_s, 1), "methods": res.methods, "proxy": res.result,
                                  "proxy_dense": res.dense})
        rec["extra"]["goal"] = _goal(rec, singles, metric)
        if previous is res:
            rec["extra"]["sensitivity_table"] = [{k: v for k, v in r.items() if k != "config"} for r in res.table]
        bench.save(args.out)
        print(res.format_table() if previous is res else f"chosen: {res.chosen}", flush=True)
        print(f"[mixed] {name} {b['label']}: {metric}={q[metric]:.4g} bytes={s['bytes_fp16']} goal met="
              f"{rec['extra']['goal']['met']}", flush=True)
        res.model = None
        gc.collect()


def merge(paths: list[str], out: str | None = None) -> Path:
    """Concatenate the records of per-model result files (runs of this suite) into ``results/mixed.json``, with a
    summary per model in the description, and draw ``mixed.png`` (parameters axis) and ``mixed.bytes.png``."""
    from benchmarks.harness import RESULTS_DIR
    from benchmarks.plot import plot_file

    docs = [json.loads(Path(p).read_text()) for p in paths]
    records, dense = [], set()
    for r in (r for d in docs for r in d["records"]):
        if r["method"] == "dense":  # one dense row per model (every run measures the same)
            if r["model"] in dense:
                continue
            dense.add(r["model"])
        records.append(r)
    doc = {**docs[0], "records": records,
           "wall_s": sum(d.get("wall_s", 0) for d in docs),
           "description": " || ".join(f"[{Path(p).name}] {d['description']}" for p, d in zip(paths, docs)),
           "runs": [{"file": Path(p).name, "created": d.get("created"), "wall_s": d.get("wall_s")}
                    for p, d in zip(paths, docs)]}
    for r in doc["records"]:  # goals against every single setting of the model, whichever run measured it
        if r["method"] == "mixed" and r.get("quality"):
            metric = "ppl" if "ppl" in r["quality"] else "wer"
            singles = [s for s in doc["records"] if s["model"] == r["model"] and s.get("quality")
                       and s["method"] not in ("dense", "mixed")]
            r["extra"]["goal"] = _goal(r, singles, metric)
    doc["summary"] = summary(doc["records"])
    target = Path(out) if out else RESULTS_DIR / "mixed.json"
    target.write_text(json.dumps(doc, indent=2) + "\n")
    plot_file(target)
    plot_bytes(doc, target.with_suffix(".bytes.png"))
    return target


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: each mixed plan's size, quality and goal check, and the single settings."""
    out: dict[str, Any] = {}
    for r in records:
        metric = "ppl" if "ppl" in r.get("quality", {}) else "wer"
        if not r.get("quality"):
            continue
        m = out.setdefault(r["model"], {"metric": metric, "mixed": [], "single": []})
        row = {"method": r["method"], "setting": r["setting"].get("label"), metric: r["quality"][metric],
               "bytes_fp16": r["size"]["bytes_fp16"]}
        if r["method"] == "mixed":
            goal = r["extra"]["goal"]
            row.update(methods=r["extra"]["methods"], goal_met=goal["met"], pareto=goal.get("pareto"),
                       same_quality_singles=[f"{g['method']} {g['setting']}" for g in goal["singles_same_quality"]],
                       dominates=[f"{g['method']} {g['setting']}" for g in goal["dominates"]])
            m["mixed"].append(row)
        elif r["method"] != "dense":
            m["single"].append(row)
        else:
            m["dense"] = row
    for m in out.values():
        m["goal_met_by_some_plan"] = any(x["goal_met"] for x in m["mixed"])
        m["pareto_by_some_plan"] = any(x["pareto"] for x in m["mixed"])
    return out


def plot_bytes(doc: dict[str, Any], path: Path) -> None:
    """Quality vs stored bytes (floats at 2 bytes) per model, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in doc["records"] if r.get("quality")})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        recs = [r for r in doc["records"] if r["model"] == model and r.get("quality")]
        metric = "ppl" if "ppl" in recs[0]["quality"] else "wer"
        for method in sorted({r["method"] for r in recs}):
            pts = sorted((r["size"]["bytes_fp16"] / 1e6, r["quality"][metric]) for r in recs if r["method"] == method)
            ax.plot(*zip(*pts), "o-" if method != "mixed" else "*-", label=method, ms=6 if method != "mixed" else 12)
        ax.set_yscale("log")
        ax.set_xlabel("stored MB (floats at 2 bytes)")
        ax.set_ylabel(f"{metric} (lower is better, log)")
        ax.set_title(f"{model}: mixed plans vs single methods")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    from benchmarks.harness import Bench

    if argv and argv[0] == "merge":
        print(merge(argv[1:]))
        return 0

    parser = argparse.ArgumentParser(prog="python -m benchmarks suite mixed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=None, help="single-method baselines to run (default all)")
    parser.add_argument("--drop", nargs="*", default=[], help="single settings to skip, as 'method:label'")
    parser.add_argument("--match", nargs="*", default=["jlcm", "low_rank"],
                        help="methods whose settings' sizes are also used as mixed-plan budgets")
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.6, 0.3])
    parser.add_argument("--budget", default="quick", choices=["default", "quick"])
    parser.add_argument("--voices", nargs="+", default=["en-us", "en-gb"])
    parser.add_argument("--calib-samples", type=int, default=10)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=2, help="calibration batches held out to score candidates")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bench = Bench("mixed", budget=args.budget, description=(
        f"Mixed plans from hf_compress.plan (per-group sensitivity on {args.held_out} held-out calibration batches "
        f"of {args.calib_samples}x{args.calib_len}; candidates: TT adaptive embeddings x1.5/2/4 and codebook "
        "embeddings 6/4 bits (same JLCM layout, Σ = I + the tied head's input moments), product twins 0.75/0.5 "
        "(whitened), whitened low-rank 0.75/0.5, codebooks 4/3 bits (JLCM layout: k-means + one GPTQ-style "
        "error-feedback mapping, no joint steps, for CPU time)) vs single-method settings (codebooks on the block "
        "linears alone and on the linears + token embedding), at matched bytes (budget = each single setting's "
        "bytes) and at "
        f"fractions {args.fractions}. Quality budget '{args.budget}'; Whisper WER on voices {args.voices} only "
        "(quick: 16 test utterances per voice). size.bytes_fp16 counts floats at 2 bytes. No latency measured. "
        "extra.goal: met if a single setting has the same quality (at least as good, within 10%) and every single "
        "setting at least as good is larger than the plan."
        + (f" Skipped single settings (CPU time): {args.drop}." if args.drop else "")))
    for name in args.models:
        try:
            run_model(name, args, bench)
        except Exception as err:  # one model failing must not lose the rest
            print(f"[mixed] {name} failed: {type(err).__name__}: {err}", flush=True)
            bench.record(name, "failed", extra={"error": f"{type(err).__name__}: {err}"})
        bench.save(args.out)
    print(bench.save(args.out))
    from benchmarks.plot import plot_file

    print(plot_file(bench.save(args.out)))
    return 0
