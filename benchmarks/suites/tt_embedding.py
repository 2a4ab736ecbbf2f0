"""Tensor-train embeddings (issue #4): dense vs per-token TT (paper), adaptive TT (ours), TT-matrix, whole-matrix SVD.

``python -m benchmarks suite tt_embedding [--models ...] [--budget quick] [--formats ...] [--ratios ...]
[--extras all|none|only] [--wer-utterances N] [--note TEXT] [--out PATH]``; ``--merge A.json B.json ...
[--replace]`` joins runs (with ``--replace`` later rows replace earlier ones of the same model, method and ratio).

Per model, in one run: the dense model, then every (format, compression) setting compresses only the token
embedding (tied heads read the compressed table, ``tied_head="compressed"``), plus extra rows: TT-matrix at 2x, and
on tied models every format at 2x with ``tied_head="dense"`` (head untied, dense copy: more parameters in total).
Recorded: embedding relative reconstruction error, compress (TT-SVD) time, quality (perplexity / encoder scores /
WER via ``harness.quality``), params and disk bytes, embedding lookup latency (8 x 512 ids) and forward latency /
decode tokens/s, each measured interleaved with the dense model (``extra`` holds the paired ratios). Token
weights for the adaptive format: calibration-text counts (for speech models with the speech test sentences cut
out, as those are drawn from the same text) + the id-rank Zipf prior; control tokens kept at full rank. Its row
metric (``metric="auto"``, the default): lookup error + the tied head's logit error weighted by the head's input
second moments, the head weight (0 = lookup error only, 1, 4, 16) chosen by next-token loss on ~4k calibration
tokens; speech models get 16 train utterances per voice with their transcripts for this (teacher-forced).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import data, harness, zoo

MODELS = ["smollm2-135m", "gemma3-270m", "minilm-l6", "whisper-tiny.en"]
RATIOS = [1.5, 2.0, 3.0]
FORMATS = ["per_token", "adaptive", "svd"]
# (format, ratio, tied_head): the TT-matrix format, and every format with the tied head kept untied dense.
EXTRA = [("tt_matrix", 2.0, "compressed"), ("adaptive", 2.0, "dense"), ("per_token", 2.0, "dense"),
         ("svd", 2.0, "dense")]


def embedding_name(model: Any) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)


@torch.inference_mode()
def paired_lookup(modules: dict[str, Any], vocab: int, rounds: int = 7) -> dict[str, float]:
    """Median seconds of one embedding lookup of a fixed ``[8, 512]`` batch of ids, per module, interleaved."""
    ids = torch.randint(0, vocab, (8, 512), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in modules}
    for module in modules.values():
        module(ids)
    for _ in range(rounds):
        for name, module in modules.items():
            start = time.perf_counter()
            module(ids)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def calibration_ids(tok: Any, kind: str, n_samples: int = 128, seq_len: int = 512) -> list[torch.Tensor]:
    """Calibration windows ``[1, seq_len]`` for the token counts. Speech models: the speech test sentences are drawn
    from the calibration text, so those sentences are cut out of it first (counts never see test transcripts)."""
    if kind != "speech-seq2seq":
        return data.calibration_batches(tok, n_samples=n_samples, seq_len=seq_len)
    import numpy as np

    test = {re.sub(r"\s+", " ", u.text).strip() for split in data.speech_set().values() for u in split["test"]}
    kept = []
    for article in data.calibration_text().splitlines():
        sents = re.split(r"(?<=[.!?])\s+(?=[A-Z])", article.strip())
        kept.append(" ".join(s for s in sents if re.sub(r"\s+", " ", s).strip() not in test))
    ids = torch.tensor(data.encode_plain(tok, "\n".join(kept)), dtype=torch.long)
    starts = np.random.default_rng(0).integers(0, ids.numel() - seq_len, size=n_samples)
    return [ids[s:s + seq_len].unsqueeze(0) for s in starts.tolist()]


def run_model(bench: harness.Bench, name: str, args: argparse.Namespace) -> None:
    from hf_compress import CompressionConfig, compress
    from hf_compress.methods.tt_embedding import TTEmbeddingConfig

    budget, out = args.budget, args.out
    model, tok = zoo.load(name)
    kind = harness.model_kind(model)
    text_tok = getattr(tok, "tokenizer", tok)
    emb_name = embedding_name(model)
    weight = model.get_submodule(emb_name).weight.detach().clone()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight.data_ptr() == model.get_submodule(emb_name).weight.data_ptr()
    calibration: list[Any] = calibration_ids(text_tok, kind)
    if kind == "speech-seq2seq":  # 16 train utterances per voice with their transcripts: the tied head's statistics
        utterances = [u for split in data.speech_set().values() for u in split["train"][:16]]
        calibration += data.speech_calibration_batches(tok, utterances, model.config.max_target_positions)
    if args.wer_utterances is not None:
        harness.BUDGETS[budget]["wer_utterances"] = args.wer_utterances  # written into the JSON's "budget"
    print(f"[tt_embedding] {name}: {emb_name} {list(weight.shape)} tied={tied}", file=sys.stderr, flush=True)
    dense_setting = {"embedding": emb_name, "vocab": weight.shape[0], "dim": weight.shape[1], "tied": tied}
    if args.dense_from:  # reuse the dense record of an earlier run with the same budget (deterministic quality)
        import json

        doc = json.loads(Path(args.dense_from).read_text())
        old = next(r for r in doc["records"] if r["model"] == name and r["method"] == "dense")
        dense_rec = bench.record(name, "dense", {**dense_setting, "copied_from_run": doc["created"]},
                                 quality=old["quality"], size=old["size"], latency=old["latency"])
    else:
        dense_latency = harness.latency(model, kind, budget=budget)
        dense_latency["lookup_8x512_s"] = paired_lookup({"dense": model.get_submodule(emb_name)},
                                                        weight.shape[0])["dense"]
        dense_rec = bench.record(name, "dense", dense_setting, quality=harness.quality(model, tok, kind, budget=budget),
                                 size=harness.size(model, (emb_name,)), latency=dense_latency)
    bench.save(out)
    settings = [] if args.extras == "only" else [(f, r, "compressed") for f in args.formats for r in args.ratios]
    if args.extras != "none":
        extra = EXTRA if not args.extra_rows else [(f, float(r), h) for f, r, h in
                                                   (row.split(":") for row in args.extra_rows)]
        settings += [(f, r, h) for f, r, h in extra if h == "compressed" or tied]
    settings.sort(key=lambda s: abs(s[1] - 2.0))  # the 2x rows (the goal's) first, so a cut-off run still has them
    for fmt, ratio, head_mode in settings:
        m = copy.deepcopy(model)
        cfg = TTEmbeddingConfig(format=fmt, compression=ratio, tied_head=head_mode)
        start = time.perf_counter()
        compress(m, CompressionConfig(modules={re.escape(emb_name) + "$": cfg}), calibration=calibration,
                 progress=False)
        seconds = time.perf_counter() - start
        layer = m.get_submodule(emb_name)
        with torch.no_grad():
            rel_err = float((layer.weight - weight).norm() / weight.norm())
        # stored bytes (factors and per-token index buffers) over the dense fp32 table's
        emb_params = sum(t.numel() * t.element_size() for t in layer.state_dict().values()) / weight.element_size()
        layer.cache_table = True  # quality only: tied-head logits reuse one materialized table (same numbers)
        quality = harness.quality(m, tok, kind, budget=budget)
        layer.cache_table = False
        layer.__dict__.pop("_table_cache", None)
        extra = {"embedding_rel_error": rel_err, "compress_s": seconds,
                 "embedding_compression": weight.numel() / emb_params,
                 **({"metric_choice": layer.metric_choice} if hasattr(layer, "metric_choice") else {})}
        lookup = paired_lookup({"dense": model.get_submodule(emb_name), "tt": layer}, weight.shape[0])
        extra["lookup_ratio_vs_dense"] = lookup["tt"] / lookup["dense"]
        latency = {"lookup_8x512_s": lookup["tt"]}
        lat: dict[str, dict[str, float]] = {}
        if fmt not in args.skip_latency:
            lat = harness.paired_latency({"dense": model, "tt": m}, kind, budget=budget)
            latency.update(lat["tt"])
            extra["forward_ratio_vs_dense_paired"] = lat["tt"]["forward_s"] / lat["dense"]["forward_s"]
        if "decode_tokens_per_s" in lat.get("tt", {}):
            extra["decode_tokens_per_s_dense_paired"] = lat["dense"]["decode_tokens_per_s"]
            extra["decode_ratio_vs_dense_paired"] = (lat["tt"]["decode_tokens_per_s"]
                                                     / lat["dense"]["decode_tokens_per_s"])
        rec = bench.record(name, f"tt_{fmt}" + ("" if head_mode == "compressed" else "_densehead"),
                           {"format": fmt, "compression": ratio, "tied_head": head_mode, "layer": layer.spec(),
                            **({"prior": cfg.prior, "prior_weight": cfg.prior_weight,
                                "frequency_smoothing": cfg.frequency_smoothing, "keep_special": cfg.keep_special,
                                "metric": cfg.metric}
                               if fmt == "adaptive" else {})},
                           quality=quality, size=harness.size(m, (emb_name,)), latency=latency, extra=extra,
                           dense=dense_rec)
        print(f"[tt_embedding] {name} {fmt} x{ratio} head={head_mode}: err={rel_err:.3f} t={seconds:.1f}s "
              f"q={rec['quality']}", file=sys.stderr, flush=True)
        del m, layer
        bench.save(out)


def time_tt_svd(bench: harness.Bench, name: str, threads: int, out: str | None, repeats: int = 3) -> None:
    """Wall time of the paper's per-token TT-SVD (batched, one SVD per mode) of ``name``'s whole token table at
    1.5/2/3x with ``threads`` torch threads; the 1-minute load average is recorded beside it (shared machine)."""
    import os

    from hf_compress.methods.tt_embedding import TTEmbeddingConfig, build_embedding

    model, _ = zoo.load(name)
    weight = model.get_input_embeddings().weight.detach().clone()
    del model
    torch.set_num_threads(threads)
    for ratio in RATIOS:
        cfg = TTEmbeddingConfig(format="per_token", compression=ratio)
        times, load = [], []
        for _ in range(repeats):
            load.append(os.getloadavg()[0])
            start = time.perf_counter()
            layer = build_embedding(weight, cfg)
            times.append(time.perf_counter() - start)
        bench.record(name, "tt_svd_time", {"format": "per_token", "compression": ratio, "layer": layer.spec(),
                                           "vocab": weight.shape[0], "dim": weight.shape[1]},
                     extra={"compress_s": min(times), "compress_s_all": times, "torch_threads": threads,
                            "load_avg_1min": load, "goal_s": 10.0, "goal_met": min(times) <= 10.0})
        print(f"[tt_embedding] TT-SVD {name} x{ratio}: {times} s (load {load})", file=sys.stderr, flush=True)
        bench.save(out)


def analyze_table(bench: harness.Bench, name: str, out: str | None, ratio: float = 2.0) -> None:
    """Why low rank loses on ``name``'s token table: the relative error of the best rank-``r`` approximation of
    the whole table (its spectrum), and, for the adaptive format at ``ratio`` (head untied dense, identity metric:
    the lookup alone), each tier's rank, token count, relative error and share of the evaluated text's tokens (the
    perplexity text's scored tokens; Whisper: the test transcripts the WER rows use). Writes a PNG beside ``out``."""
    from hf_compress import CompressionConfig, compress
    from hf_compress.methods.tt_embedding import TTEmbeddingConfig

    model, tok = zoo.load(name)
    kind = harness.model_kind(model)
    text_tok = getattr(tok, "tokenizer", tok)
    emb_name = embedding_name(model)
    weight = model.get_submodule(emb_name).weight.detach().float().clone()
    d = weight.shape[1]
    energy = torch.linalg.svdvals(weight).double().pow(2)
    lost = (1 - energy.cumsum(0) / energy.sum()).clamp_min(0).sqrt()  # [d]: rel. error of the best rank-(i+1)
    ranks = sorted({max(1, round(d / 2 ** (i / 2))) for i in range(14)}, reverse=True)
    cfg = TTEmbeddingConfig(compression=ratio, tied_head="dense", metric="identity")
    compress(model, CompressionConfig(modules={re.escape(emb_name) + "$": cfg}),
             calibration=calibration_ids(text_tok, kind), progress=False)
    layer = model.get_submodule(emb_name)
    b = harness.BUDGETS[bench.budget]
    if kind == "speech-seq2seq":
        texts = [u.text for split in data.speech_set().values() for u in split["test"][: b["wer_utterances"]]]
        ids = torch.tensor([i for t in texts for i in data.encode_plain(text_tok, " " + t.strip())])
    else:
        ids = torch.tensor(data.encode_plain(text_tok, data.eval_text(), b["ppl_tokens"]))
    tier = layer.tier.long()
    with torch.no_grad():
        approx = layer.weight.float()
    tiers = []
    for t, r in enumerate(layer.tier_ranks):
        rows = (tier == t).nonzero().squeeze(1)
        err = float((approx[rows] - weight[rows]).norm() / weight[rows].norm().clamp_min(1e-12))
        tiers.append({"rank": r, "tokens": rows.numel(), "rel_error": err,
                      "eval_token_share": float((tier[ids] == t).double().mean())})
    extra = {"spectrum_rel_error": {str(r): float(lost[r - 1]) for r in ranks}, "tiers": tiers,
             "eval_tokens": ids.numel(),
             "eval_tokens_not_exact": float((torch.tensor(layer.tier_ranks)[tier[ids]] < d).double().mean())}
    bench.record(name, "table_analysis", {"format": "adaptive", "compression": ratio, "tied_head": "dense",
                                          "metric": "identity", "vocab": weight.shape[0], "dim": d}, extra=extra)
    print(f"[tt_embedding] {name} table analysis: {extra}", file=sys.stderr, flush=True)
    bench.save(out)
    _plot_analysis(bench, out)


def _plot_analysis(bench: harness.Bench, out: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in bench.records if r["method"] == "table_analysis"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in recs:
        spec = r["extra"]["spectrum_rel_error"]
        axes[0].plot([int(k) / r["setting"]["dim"] for k in spec], list(spec.values()), "o-", label=r["model"])
        tiers = r["extra"]["tiers"]
        shown = [t for t in tiers if t["eval_token_share"] > 0]  # log axis: tiers no evaluated token uses left out
        axes[1].plot([t["rel_error"] for t in shown], [t["eval_token_share"] for t in shown], "o-", label=r["model"])
    axes[0].set(xlabel="rank / embedding dim", ylabel="relative error of the best rank-r table",
                title="whole-table spectrum")
    axes[1].set(xlabel="tier relative error (adaptive, 2x)", ylabel="share of evaluated tokens", yscale="log",
                title="where the evaluated tokens sit")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(out or harness.RESULTS_DIR / "tt_table_analysis.json").with_suffix(".png"), dpi=110)
    plt.close(fig)


def _runs(doc: dict[str, Any], note: str) -> list[tuple[str, Any, str, list[dict[str, Any]]]]:
    """``(run stamp, budget, description line, records)`` per run of a result file (a merged file keeps its runs)."""
    if doc["records"] and all("run" in r for r in doc["records"]):  # an earlier merge
        lines = {m.group(1): m.group(0) for m in re.finditer(r"^- run (\S+) .*$", doc["description"], re.M)}
        stamps = list(dict.fromkeys(r["run"] for r in doc["records"]))
        return [(st, doc["budget"].get(st), lines.get(st, f"- run {st}"), [r for r in doc["records"] if r["run"] == st])
                for st in stamps]
    models = sorted({r["model"] for r in doc["records"]})
    budget = next(iter(doc.get("budget", {})), "?")
    line = f"- run {doc['created']} ({budget} budget, {doc.get('wall_s')} s, models {models}): {note}"
    records = [{**r, "run": doc["created"]} for r in doc["records"]
               if "copied_from_run" not in r.get("setting", {})]  # a copied dense record is already there
    return [(doc["created"], doc.get("budget"), line, records)]


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["model"], record["method"], record.get("setting", {}).get("compression")


def merge(paths: list[str], out: str | None, notes: list[str], replace: bool = False) -> Path:
    """Concatenate the records of several runs of this suite (or earlier merges) into one file; every record gets
    ``"run"`` (its source run's ``created`` stamp; dense records copied by ``--dense-from`` are dropped as
    duplicates), and the description lists each run's budget, time and note. With ``replace``, a file's records
    replace those of the files before it with the same (model, method, compression) (emptied runs are dropped)."""
    import json

    docs = [json.loads(Path(p).read_text()) for p in paths]
    runs: list[tuple[str, Any, str, list[dict[str, Any]]]] = []
    for i, doc in enumerate(docs):
        new = _runs(doc, notes[i] if i < len(notes) else "")
        if replace:
            keys = {_key(r) for run in new for r in run[3]}
            runs = [(st, b, line, [r for r in recs if _key(r) not in keys]) for st, b, line, recs in runs]
            runs = [run for run in runs if run[3]]
        runs += new
    lines = [__doc__.strip().splitlines()[0], "Merged runs (record['run'] names the run):"]
    lines += [line for _, _, line, _ in runs]
    merged = {**docs[-1], "description": "\n".join(lines), "budget": {st: b for st, b, _, _ in runs},
              "records": [r for run in runs for r in run[3]],
              "wall_s": sum(d.get("wall_s", 0) for d in docs)}
    target = Path(out) if out else harness.RESULTS_DIR / "tt_embedding.json"
    target.write_text(json.dumps(merged, indent=2) + "\n")
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks suite tt_embedding", description=__doc__)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=list(zoo.ZOO))
    parser.add_argument("--budget", default="default", choices=list(harness.BUDGETS))
    parser.add_argument("--formats", nargs="*", default=FORMATS, help="main grid formats")
    parser.add_argument("--ratios", nargs="+", type=float, default=RATIOS, help="main grid compression ratios")
    parser.add_argument("--extras", default="all", choices=["all", "none", "only"],
                        help="the extra rows (TT-matrix 2x; dense-head 2x on tied models): with/without/only them")
    parser.add_argument("--extra-rows", nargs="+", default=None, metavar="FORMAT:RATIO:HEAD",
                        help="replace the extra rows, in this order (e.g. adaptive:2:dense tt_matrix:2:compressed)")
    parser.add_argument("--dense-from", default=None, metavar="JSON",
                        help="take the dense record from this earlier run of the suite (same budget) instead of "
                             "measuring it again; latency ratios stay paired within this run")
    parser.add_argument("--skip-latency", nargs="*", default=[], metavar="FORMAT",
                        help="formats whose rows skip the forward/decode latency (the lookup latency is kept)")
    parser.add_argument("--wer-utterances", type=int, default=None,
                        help="Whisper: test utterances per voice (default: the budget's; recorded in the JSON)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPUs are shared)")
    parser.add_argument("--note", default="", help="appended to the JSON description (e.g. a stated reduction)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/tt_embedding.json)")
    parser.add_argument("--time-tt-svd", action="store_true",
                        help="instead of running: time the per-token TT-SVD of the first model's table (--threads)")
    parser.add_argument("--analyze-table", action="store_true",
                        help="instead of running: the tables' spectra and where the evaluated tokens sit among the "
                             "adaptive format's tiers at 2x (--out, default results/tt_table_analysis.json)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="instead of running: merge these result files (in order) into --out")
    parser.add_argument("--merge-notes", nargs="*", default=[], help="one note per merged file")
    parser.add_argument("--replace", action="store_true",
                        help="with --merge: a later file's rows replace earlier rows of the same model, method, ratio")
    args = parser.parse_args(argv)
    if args.merge:
        print(merge(args.merge, args.out, args.merge_notes, args.replace))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    description = __doc__.strip().splitlines()[0] + (f" {args.note}" if args.note else "")
    bench = harness.Bench("tt_embedding", args.budget, description=description)
    failed = []
    if args.analyze_table:
        out = args.out or str(harness.RESULTS_DIR / "tt_table_analysis.json")
        bench.description = (
            "Why low rank loses on these token tables (issue #4), no quality measured: spectrum_rel_error = relative "
            "error of the best rank-r approximation of the whole table; tiers = the adaptive format at 2x (head "
            "untied dense, identity metric, counts from the suite's calibration text): per tier its rank, tokens, "
            "relative error and share of the evaluated tokens (the first ppl_tokens tokens of the perplexity text; "
            "Whisper: the test transcripts of the WER rows, wer_utterances per voice; MiniLM is not scored on that "
            "text, so its shares are a proxy)." + (f" {args.note}" if args.note else ""))
        for name in args.models:
            analyze_table(bench, name, out)
        print(out)
        return 0
    if args.time_tt_svd:
        time_tt_svd(bench, args.models[0], args.threads, args.out)
        print(bench.save(args.out))
        return 0
    for name in args.models:
        try:
            run_model(bench, name, args)
        except Exception as err:
            failed.append(name)
            bench.record(name, "error", extra={"error": f"{type(err).__name__}: {err}"[:500]})
            print(f"[tt_embedding] {name} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        print(bench.save(args.out), flush=True)
    return 1 if failed else 0
