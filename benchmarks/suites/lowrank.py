"""Low-rank suite: ``python -m benchmarks suite lowrank [--part methods|sweep|all] [--budget default|quick]``.

``methods``: SmolLM2-135M, every attention + MLP linear (not embeddings / head) at one uniform kept-parameter
ratio chosen so the whole model loses 10/20/30 % of its parameters; perplexity for svd, asvd, whitened, tucker in
one run. Tucker decomposes attention only (``[heads, head_dim, hidden]`` tensors); to reach the same budget its
MLP layers get plain SVD at the same ratio (a matrix is a 2-way tensor, whose Tucker form is the SVD).
Optional rows ``whitened-seq`` / ``asvd-seq`` (``--methods``): the same ratios with ``sequential=True``.
``sweep``: ``hf_compress.sweep`` (whitened) chooses a plan at ≈ -9 % model size on SmolLM2 and Whisper tiny.en;
quality drop, forward latency ratio and decode tokens/s ratio vs dense.

Calibration: ``data.calibration_batches`` (news text, disjoint from the Wikipedia perplexity text); the sweep's
own sensitivity metric also uses news text, so the reported perplexity is on text the search never saw.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig

from .. import data, harness, metrics, zoo

LLAMA_LINEAR = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
LLAMA_ATTN = r"self_attn\.(q|k|v|o)_proj$"
LLAMA_MLP = r"mlp\.(gate|up|down)_proj$"
# BERT (MiniLM-L6): every encoder linear; attention = Q/K/V + attention output, MLP = intermediate + output.
BERT_LINEAR = (r"encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)"
               r"|intermediate\.dense|output\.dense)$")
BERT_ATTN = r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)$"
BERT_MLP = r"encoder\.layer\.\d+\.(intermediate|output)\.dense$"
PATTERNS = {"smollm2-135m": (LLAMA_LINEAR, LLAMA_ATTN, LLAMA_MLP), "minilm-l6": (BERT_LINEAR, BERT_ATTN, BERT_MLP)}


def _linears(model: torch.nn.Module, pattern: str) -> list[tuple[str, int, int]]:
    plan = CompressionConfig(modules={pattern: LowRankConfig(rank=1)})
    return [(n, m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and plan.method_for(n)]


def uniform_ratio(model: torch.nn.Module, pattern: str, cut: float) -> float:
    """The ``rank_ratio`` for every layer matching ``pattern`` that removes ``cut`` of the model's parameters."""
    layers, total = _linears(model, pattern), metrics.param_count(model)

    def saved(rho: float) -> int:
        cfg, out = LowRankConfig(rank_ratio=rho), 0
        for _, m, n in layers:
            r = cfg.rank_for(m, n)
            out += max(0, m * n - r * (m + n)) if r * (m + n) < m * n else 0
        return out

    lo, hi = 1e-3, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if saved(mid) >= cut * total else (lo, mid)
    return lo


def plan_for(method: str, rho: float, model: str = "smollm2-135m") -> CompressionConfig:
    """``method``: svd / asvd / whitened / tucker, ``<svd method>-global`` (ranks allocated across layers) or
    ``<whitened|asvd>-seq`` (each block calibrated on the already compressed blocks, ``sequential=True``)."""
    linear, attn, mlp = PATTERNS[model]
    if method.endswith("-seq"):
        return CompressionConfig(modules={linear: LowRankConfig(method=method.removesuffix("-seq"), rank_ratio=rho,
                                                                sequential=True)})
    if method.endswith("-global"):
        return CompressionConfig(modules={linear: LowRankConfig(method=method.removesuffix("-global"),
                                                                rank_ratio=rho, allocation="global")})
    if method == "tucker":
        return CompressionConfig(modules={attn: LowRankConfig(method="tucker", rank_ratio=rho),
                                          mlp: LowRankConfig(method="svd", rank_ratio=rho)})
    return CompressionConfig(modules={linear: LowRankConfig(method=method, rank_ratio=rho)})


def _measure(bench: harness.Bench, name: str, model: Any, tok: Any, kind: str, budget: str, method: str,
             setting: dict[str, Any], dense: dict[str, Any] | None, extra: dict[str, Any] | None = None,
             timing: bool = True) -> dict[str, Any]:
    q = harness.quality(model, tok, kind, budget=budget)
    size = {"params": metrics.param_count(model)}
    lat = harness.latency(model, kind, budget=budget) if timing else {}
    rec = bench.record(name, method, setting, quality=q, size=size, latency=lat, extra=extra or {}, dense=dense)
    print(f"[lowrank] {name} {method} {setting}: {q} params={size['params']:,} {lat}", flush=True)
    return rec


def _record_cut(bench: harness.Bench, name: str, model: Any, tok: Any, kind: str, budget: str, method: str,
                cut: float, setting: dict[str, Any], extra: dict[str, Any], dense: dict[str, Any]) -> None:
    """Quality, parameters (and the cut they give vs ``dense``) and forward latency of one low-rank row."""
    q = harness.quality(model, tok, kind, budget=budget)
    size = {"params": metrics.param_count(model)}
    extra["params_cut"] = 1 - size["params"] / dense["size"]["params"]
    rec = bench.record(name, method, setting, quality=q, size=size, latency=_forward_s(model, kind, budget),
                       extra=extra, dense=dense)
    print(f"[lowrank] {name} {method} cut={cut}: {q} params_cut={extra['params_cut']:.4f} ratios={rec['ratios']}",
          flush=True)


def _forward_s(model: Any, kind: str, budget: str) -> dict[str, float]:
    """Median forward latency only (decode throughput is measured for the sweep plans)."""
    b = harness.BUDGETS[budget]
    ids = torch.randint(0, model.config.vocab_size, (b["latency_batch"], b["latency_seq"]),
                        generator=torch.Generator().manual_seed(0))
    return {"forward_s": metrics.forward_latency(model, {"input_ids": ids}, repeats=3, warmup=1)["median_s"]}


def _calibration(name: str, tok: Any, n: int, seq: int) -> list[torch.Tensor]:
    """News windows ``[1, seq]``; encoders get ``[CLS] … [SEP]`` windows like their evaluation inputs."""
    if name == "minilm-l6":
        from .subspace import calibration
        return calibration(tok, n, seq)
    return data.calibration_batches(tok, n, seq)


def run_methods(bench: harness.Bench, budget: str, cuts: list[float], methods: list[str], n_calib: int,
                name: str = "smollm2-135m", seq: int = 256, label: str = "") -> None:
    """One spectrum per layer and method (calibrated once), truncated per cut: the layers ``compress()`` builds.

    ``label`` is appended to the method names of the records (e.g. ``"-calib64"`` for a calibration-size check).
    """
    from hf_compress.methods import lowrank as lr
    from hf_compress.sweep import LayerSwapper

    linear = PATTERNS[name][0]
    model, tok = zoo.load(name)
    kind = harness.model_kind(model)
    q = harness.quality(model, tok, kind, budget=budget)
    dense = bench.record(name, "dense", {}, quality=q, size={"params": metrics.param_count(model)},
                         latency=_forward_s(model, kind, budget), extra={"source_run": label or "methods"})
    print(f"[lowrank] dense {dense}", flush=True)
    bench.save()
    calib = _calibration(name, tok, n_calib, seq)
    rhos = {cut: uniform_ratio(model, linear, cut) for cut in cuts}
    names = [n for n, _, _ in _linears(model, linear)]
    lr.CALIBRATION_CHUNK_BYTES = 2 * 2**30  # one calibration pass (SmolLM2: ~0.8 GB of float64 covariances)
    for method in methods:
        if method.endswith("-seq"):
            _run_sequential(bench, name, model, tok, budget, method, rhos, calib, dense, seq, label)
            continue
        start = time.perf_counter()
        spec_method = "svd" if method == "tucker" else method.removesuffix("-global")
        glob = method.endswith("-global")
        with metrics.PeakRSS() as rss:  # global allocation may give a layer any rank: keep every useful one
            swapper = LayerSwapper(model, names, [LowRankConfig(method=spec_method, rank_ratio=r)
                                                  for r in ([1.0] if glob else rhos.values())], calib)
        prep = {"prepare_s": round(time.perf_counter() - start, 1), "prepare_peak_rss_delta_bytes": rss.delta}
        if method in ("whitened", "asvd"):
            prep["calibration"] = dict(lr.CALIBRATION_REPORT)
        for cut, rho in rhos.items():
            plan = plan_for(method, rho, name)
            assignment = {n: plan.method_for(n)[1] for n in names}
            if glob:  # the ranks compress(plan) would give: the same allocation over the same spectra
                shapes = {n: (swapper.spectra[n].s, m, k) for n, m, k in _linears(model, linear)}
                keep = sum(math.floor(rho * m * k) for _, m, k in shapes.values())
                ranks = lr.allocate_ranks(shapes, keep, swapper.energy)
                assignment = {n: LowRankConfig(method=spec_method, rank=ranks[n]) for n in names}
            start = time.perf_counter()
            undo = swapper.apply(assignment)
            setting = {"target_cut": cut, "rank_ratio": round(rho, 4), "plan": plan.to_dict(),
                       "layers": "tucker attention + svd mlp" if method == "tucker" else "attention+mlp",
                       "calibration": f"{len(calib)}x{seq} news tokens" if method in ("whitened", "asvd") else None}
            extra = {**prep, "build_s": round(time.perf_counter() - start, 1), "source_run": label or "methods"}
            if glob:
                extra["ranks"] = ranks
            _record_cut(bench, name, model, tok, kind, budget, method + label, cut, setting, extra, dense)
            swapper.restore(undo)
            bench.save()
        del swapper


def _run_sequential(bench: harness.Bench, name: str, model: Any, tok: Any, budget: str, method: str,
                    rhos: dict[float, float], calib: list[Any], dense: dict[str, Any], seq: int, label: str) -> None:
    """``<method>-seq`` rows: per cut, ``compress`` a copy of the dense model with ``sequential=True`` (the
    activations of block ``i`` are measured after blocks ``< i`` were compressed, so nothing is shared across
    cuts)."""
    kind = harness.model_kind(model)
    for cut, rho in rhos.items():
        plan = plan_for(method, rho, name)
        work = copy.deepcopy(model)
        start = time.perf_counter()
        with metrics.PeakRSS() as rss:
            hf_compress.compress(work, plan, calibration=calib, progress=False)
        extra = {"compress_s": round(time.perf_counter() - start, 1), "compress_peak_rss_delta_bytes": rss.delta,
                 "source_run": label or "methods"}
        setting = {"target_cut": cut, "rank_ratio": round(rho, 4), "plan": plan.to_dict(), "layers": "attention+mlp",
                   "calibration": f"{len(calib)}x{seq} news tokens, block by block on the compressed model"}
        _record_cut(bench, name, work, tok, kind, budget, method + label, cut, setting, extra, dense)
        del work
        bench.save()


def _news_ppl_fn(tok: Any, tokens: int) -> Any:
    text = data.calibration_text()[-200_000:]  # the tail of the news text: a dev set for the search

    def fn(model: Any) -> float:
        return metrics.perplexity(model, tok, text, max_tokens=tokens, window=tokens, stride=tokens)["ppl"]
    return fn


def _whisper_dev_fn(model: Any, proc: Any, n: int) -> Any:
    """Teacher-forced token NLL on ``n`` train-split utterances (the WER test split stays unseen)."""
    from .. import speech

    utts = next(iter(data.speech_set(voices=("en-us",)).values()))["train"][:n]
    feats = proc.feature_extractor([speech.load_audio(u.path) for u in utts], sampling_rate=16000,
                                   return_tensors="pt").input_features
    labels = proc.tokenizer([" " + u.text for u in utts], return_tensors="pt", padding=True)
    ids, mask = labels.input_ids, labels.attention_mask[:, 1:]  # ids start with <|startoftranscript|>

    def fn(m: Any) -> float:
        with torch.inference_mode():
            logits = m(input_features=feats, decoder_input_ids=ids[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return float(math.exp((nll * mask).sum() / mask.sum()))
    return fn


def _latency_inputs(model: Any, kind: str, budget: str) -> dict[str, torch.Tensor]:
    b, g = harness.BUDGETS[budget], torch.Generator().manual_seed(0)
    if kind == "speech-seq2seq":
        return {"input_features": torch.randn(b["latency_batch"], model.config.num_mel_bins, 3000, generator=g),
                "decoder_input_ids": torch.full((b["latency_batch"], 4), model.config.decoder_start_token_id)}
    return {"input_ids": torch.randint(0, model.config.vocab_size, (b["latency_batch"], b["latency_seq"]), generator=g)}


def run_sweep(bench: harness.Bench, budget: str, models: list[str], keep: float, n_calib: int,
              sizes: list[float], damping: float = 0.0) -> None:
    for name in models:
        kind = zoo.ZOO[name].kind
        try:
            model, tok = zoo.load(name)
        except Exception as err:  # the Whisper converter is another work item; record why it is missing
            bench.record(name, "sweep", {"budget_params": keep}, extra={"error": f"{type(err).__name__}: {err}"})
            print(f"[lowrank] {name} unavailable: {err}", flush=True)
            continue
        if kind == "causal-lm":
            types = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
            candidates = [rf"layers\.\d+\.{re.escape(t)}$" for t in types]
            calib = data.calibration_batches(tok, n_calib, 256)
            eval_fn = _news_ppl_fn(tok, 1024 if budget == "default" else 512)
        else:
            candidates = [rf"{side}\.layers\.\d+\.{m}$" for side in ("encoder", "decoder")
                          for m in ("self_attn\\.(q|k|v|out)_proj", "fc1", "fc2")]
            candidates.insert(4, r"decoder\.layers\.\d+\.encoder_attn\.(q|k|v|out)_proj$")
            eval_fn = _whisper_dev_fn(model, tok, 16 if budget == "default" else 4)
            calib = _whisper_calibration(model, tok, n_calib)
        dense = _measure(bench, name, model, tok, kind, budget, "dense", {}, None)
        dense_model = copy.deepcopy(model)  # timed beside the plan after the sweep (the sweep takes many minutes)

        def lat_fn(m: Any, k: str = kind) -> float:
            inputs = _latency_inputs(m, k, budget)
            return metrics.forward_latency(m, inputs, repeats=3, warmup=1)["median_s"]
        configs = [LowRankConfig(method="whitened", rank_ratio=r, damping=damping) for r in sizes]
        result = hf_compress.sweep(model, candidates, configs, calibration=calib, eval_fn=eval_fn,
                                   budget=keep, method="whitened", latency_fn=lat_fn, path_evals=2)
        hf_compress.compress(model, result.config, calibration=calib, progress=False)
        lat = harness.paired_latency({"dense": dense_model, "plan": model}, budget=budget)
        del dense_model
        extra = {"plan": result.config.to_dict(), "chosen": result.chosen, "dev_metric": result.dense,
                 "table": result.table, "pareto": result.pareto, "path": result.path, "paired_latency": lat,
                 "forward_ratio_vs_dense_paired": lat["plan"]["forward_ratio"]}
        if "decode_ratio" in lat["plan"]:
            extra["decode_ratio_vs_dense_paired"] = lat["plan"]["decode_ratio"]
        rec = _measure(bench, name, model, tok, kind, budget, "sweep-whitened",
                       {"budget_params": keep, "candidates": candidates, "sizes": sizes,
                        "calibration": len(calib), "damping": damping}, dense, extra)
        print(f"[lowrank] {name} sweep ratios: {rec['ratios']}", flush=True)
        bench.save()
        del model


def _whisper_calibration(model: Any, proc: Any, n: int) -> list[dict[str, torch.Tensor]]:
    from .. import speech

    utts = next(iter(data.speech_set(voices=("en-gb",)).values()))["train"][-n:]
    out = []
    for u in utts:
        feats = proc.feature_extractor(speech.load_audio(u.path), sampling_rate=16000, return_tensors="pt")
        ids = proc.tokenizer(" " + u.text, return_tensors="pt").input_ids  # <|startoftranscript|> ... <|endoftext|>
        out.append({"input_features": feats.input_features, "decoder_input_ids": ids})
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks suite lowrank", description=__doc__)
    p.add_argument("--part", choices=["methods", "sweep", "all"], default="all")
    p.add_argument("--budget", choices=["default", "quick"], default="default")
    p.add_argument("--cuts", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "whitened", "tucker", "whitened-global"])
    p.add_argument("--sweep-models", nargs="+", default=["smollm2-135m", "whisper-tiny.en"])
    p.add_argument("--n-calib", type=int, default=16, help="calibration windows of 256 news tokens")
    p.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5], help="sweep rank_ratio candidates")
    p.add_argument("--damping", type=float, default=0.0, help="whitened: ridge on XᵀX/N (sweep)")
    p.add_argument("--keep", type=float, default=0.91, help="sweep parameter budget (fraction kept)")
    p.add_argument("--methods-model", choices=list(PATTERNS), default="smollm2-135m", help="model of --part methods")
    p.add_argument("--seq", type=int, default=256, help="calibration window length (tokens)")
    p.add_argument("--label", default="", help="suffix of the method names of this run's records (e.g. -calib64)")
    p.add_argument("--append", action="store_true", help="keep the records already in the results JSON")
    p.add_argument("--note", default="", help="appended to the description (which run made which rows)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (latency is measured with these)")
    p.add_argument("--out", help="results JSON (default benchmarks/results/lowrank.json)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # 1: LAPACK on a shared, oversubscribed CPU thrashes with more
    path = Path(args.out) if args.out else harness.RESULTS_DIR / "lowrank.json"
    kept = json.loads(path.read_text()) if args.append and path.exists() else None
    description = kept["description"] if kept else __doc__.split("\n\n")[1]
    bench = harness.Bench("lowrank", budget=args.budget, description=f"{description} {args.note}".strip())
    if kept:
        if kept.get("budget", {}).keys() - {args.budget}:
            raise ValueError(f"lowrank suite: --append needs the kept records' budget {list(kept['budget'])}.")
        bench.records = list(kept["records"])
    bench_save = bench.save
    bench.save = lambda out=None: bench_save(path)  # type: ignore[method-assign]
    if args.part in ("methods", "all"):
        run_methods(bench, args.budget, args.cuts, args.methods, args.n_calib, args.methods_model, args.seq,
                    args.label)
    if args.part in ("sweep", "all"):
        run_sweep(bench, args.budget, args.sweep_models, args.keep, args.n_calib, args.sizes, args.damping)
    print(bench.save())
    return 0

