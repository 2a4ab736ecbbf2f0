"""Mixed-method plans under a budget: ``plan(model, budget, calibration)`` -> :class:`PlanResult`.

The model's compressible modules are split into groups of one structural kind (``model.layers.*.mlp.up_proj``, every
``self_attn`` of the encoder, the token embedding, ...). Every candidate setting of every applicable method is
applied to **one group at a time** (on a copy, through the public :func:`hf_compress.compress` path; low-rank sizes
reuse :class:`hf_compress.sweep.LayerSwapper` so one factorization serves all ranks) and its quality on held-out
calibration batches and its stored bytes are measured. A multiple-choice greedy then takes, repeatedly, the move
with the least quality loss (in ``log`` quality, which adds up better than raw perplexity) per byte saved until the
size budget is met, or while the predicted quality stays within a quality budget. Under a size budget the last move
often saves more than needed, so the plan is then walked back: each group in turn may return to a milder candidate (or
to dense) where that lowers the predicted loss most and the plan still fits. The chosen plan is then applied for real
and measured; under a quality budget it is walked back along the greedy path until it is within budget.

Bytes count every unique stored tensor (tied weights once); floating tensors at ``float_bytes`` each (default 2:
the fp16/bf16 a checkpoint ships in), integer / packed tensors at their own width. So low-rank only pays where
``r(m+n) < mn``, and a ``b``-bit codebook saves about ``(16 - b) / 16`` of a layer.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import as_batches, keeps_training_mode
from .compress import compress
from .config import BudgetError, CompressionConfig, MethodConfig
from .methods.lowrank import LowRankConfig
from .planning_space import (
    KINDS,
    Group,
    default_candidates,
    default_quality_fn,
    find_groups,
    label,
    model_bytes,
    sequence_nll_fn,
    target,
)
from .sweep import JsonResult, LayerSwapper

__all__ = ["KINDS", "Group", "PlanResult", "default_candidates", "default_quality_fn", "find_groups", "label",
           "model_bytes", "plan", "sequence_nll_fn"]


@dataclass
class PlanResult(JsonResult):
    """``config``: the plan; ``table``: one measured row per (group, candidate); ``path``: greedy steps with
    predicted quality; ``dense`` / ``result``: ``{"bytes", "quality"}`` of the dense model and of the chosen plan
    (measured); ``chosen``: group -> candidate label; ``model``: the compressed copy (if ``keep_model``)."""

    config: CompressionConfig
    table: list[dict[str, Any]]
    path: list[dict[str, Any]]
    dense: dict[str, Any]
    result: dict[str, Any]
    chosen: dict[str, str]
    budget: dict[str, float]
    groups: dict[str, list[str]] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def methods(self) -> list[str]:
        """Registry names of the methods the plan uses."""
        return sorted({c.registry_name for c in self.config.modules.values()})

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "dense": self.dense, "result": self.result, "chosen": self.chosen,
                "methods": self.methods, "config": self.config.to_dict(), "table": self.table, "path": self.path,
                "groups": self.groups}

    def format_table(self) -> str:
        """The measured sensitivity table, the choice per group, and the plan's measured totals, as text."""
        lines = [f"{'group':44s} {'candidate':34s} {'MB saved':>9s} {'quality':>10s} {'Δlog q/MB':>10s} chosen"]
        for r in self.table:
            mark = "  <==" if self.chosen.get(r["group"]) == r["candidate"] else ""
            per = f"{r['cost_per_mb']:>10.4g}" if r["bytes_saved"] > 0 else f"{'-':>10s}"
            lines.append(f"{r['group'][:44]:44s} {r['candidate'][:34]:34s} {r['bytes_saved'] / 1e6:>9.3f} "
                         f"{r['quality']:>10.4g} {per}{mark}")
        d, res = self.dense, self.result
        lines.append(f"dense: {d['bytes'] / 1e6:.3f} MB, quality {d['quality']:.4g}  |  plan: {res['bytes'] / 1e6:.3f} "
                     f"MB ({res['bytes_ratio']:.3f} of dense), quality {res['quality']:.4g} (predicted "
                     f"{res['predicted_quality']:.4g}); methods {', '.join(self.methods) or 'none'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


# ----------------------------------------------------------------------------------------------------- plan
def _parse_budget(budget: Any, dense_bytes: int) -> tuple[str, float]:
    """``(kind, limit)`` with kind ``bytes`` (absolute target) or ``quality`` (ratio) / ``quality_delta``."""
    msg = ("hf_compress.plan: budget must be a size fraction in (0, 1) (e.g. 0.6 of the dense bytes), "
           "{'size': fraction}, {'bytes': int}, {'quality': ratio >= 1} or {'quality_delta': d > 0}; got ")
    if isinstance(budget, bool) or budget is None:
        raise ValueError(msg + repr(budget))
    if isinstance(budget, (int, float)):
        budget = {"size": float(budget)}
    if not isinstance(budget, dict) or len(budget) != 1:
        raise ValueError(msg + repr(budget))
    (kind, value), = budget.items()
    if kind not in ("size", "bytes", "quality", "quality_delta") or not isinstance(value, (int, float)) \
            or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(msg + repr(budget))
    if kind == "size":
        if not 0.0 < value < 1.0:
            raise ValueError(f"hf_compress.plan: size budget {value} must be a fraction of the dense bytes in (0, 1).")
        return "bytes", value * dense_bytes
    if kind == "bytes" and not 0 < value < dense_bytes:
        raise ValueError(f"hf_compress.plan: bytes budget {value} must be in (0, {dense_bytes}) (the dense model's "
                         "bytes at the counted float width).")
    if kind == "quality" and value < 1.0:
        raise ValueError(f"hf_compress.plan: quality budget {value} is a ratio to dense quality and must be >= 1.")
    if kind == "quality_delta" and value <= 0:
        raise ValueError(f"hf_compress.plan: quality_delta budget {value} must be > 0.")
    return kind, float(value)


def _cost(q: float, q0: float, sign: float) -> float:
    """Quality loss in log space (clipped at 0); for a zero baseline (output error) the plain difference."""
    if q0 > 0 and q > 0:
        return max(sign * math.log(q / q0), 0.0)
    return max(sign * (q - q0), 0.0)


def _within(q: float, q0: float, sign: float, kind: str, limit: float) -> bool:
    if kind == "quality":
        return sign * q <= sign * q0 * limit ** sign
    return sign * (q - q0) <= limit


@keeps_training_mode
def plan(
    model: nn.Module,
    budget: float | dict[str, float] = 0.6,
    calibration: Sequence[Any] | None = None,
    *,
    eval_batches: Sequence[Any] | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    higher_is_better: bool = False,
    candidates: dict[str, Sequence[MethodConfig]] | None = None,
    methods: Sequence[str] | None = None,
    float_bytes: int | None = 2,
    keep_model: bool = False,
    reuse: PlanResult | None = None,
    progress: bool = True,
) -> PlanResult:
    """Propose a mixed-method plan for ``model`` from measured per-group sensitivity.

    Args:
        model: a dense HF model (left unchanged; candidates are tried on copies).
        budget: ``0.6`` / ``{"size": 0.6}`` (fraction of the dense bytes), ``{"bytes": n}``, ``{"quality": 1.1}``
            (quality ratio to dense, e.g. perplexity) or ``{"quality_delta": d}``.
        calibration: model input batches (token ids ``[1, seq]`` or dicts such as Whisper's ``{"input_features",
            "decoder_input_ids"}``): fit calibrated methods; without ``eval_batches`` the last quarter is held
            out for scoring. ``None``: data-free candidates and ``eval_batches`` (or ``eval_fn``) are required.
        eval_fn: ``model -> float`` quality (lower is better unless ``higher_is_better``); default: perplexity /
            transcript perplexity / output error on the held-out batches (:func:`default_quality_fn`).
        candidates: group kind (``embedding``, ``attention``, ``linear``) -> candidate configs, replacing
            :func:`default_candidates` for the kinds given (an empty list disables a kind).
        methods: keep only candidates of these registry names (e.g. ``["low_rank"]``).
        float_bytes: width at which floating tensors are counted (``None``: their actual dtype).
        keep_model: also return the compressed copy of the chosen plan in ``result.model``.
        reuse: a previous result for this model and calibration: its measured table is reused (no new
            sensitivity trials), only the search and the final measurement run (e.g. for several budgets).
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    calibration, eval_batches = as_batches(calibration, vocab), as_batches(eval_batches, vocab)
    if eval_batches is None and calibration:
        held = max(1, len(calibration) // 4) if len(calibration) > 1 else 0
        fit, eval_batches = (calibration[:-held], calibration[-held:]) if held else (calibration, calibration)
    else:
        fit = calibration
    if eval_fn is None:
        if not eval_batches:
            raise ValueError("hf_compress.plan: give calibration batches (or eval_batches / eval_fn) to measure "
                             "quality; e.g. benchmarks.data.calibration_batches(tokenizer, 8, 256).")
        eval_fn, _ = default_quality_fn(model, list(eval_batches))
    sign = -1.0 if higher_is_better else 1.0
    dense_bytes = model_bytes(model, float_bytes)
    kind, limit = _parse_budget(budget, dense_bytes)
    groups = find_groups(model)
    if not groups:
        raise ValueError(f"hf_compress.plan: {type(model).__name__} has no embedding, attention or linear module to "
                         "compress.")
    known = set(methods) if methods is not None else None
    if known is not None:
        from .registry import available_methods

        unknown = sorted(known - set(available_methods()))
        if unknown or not known:
            raise ValueError(f"hf_compress.plan: unknown method(s) {unknown or list(methods or [])} in methods=; "
                             f"choose from {available_methods()}.")
    was_training = model.training
    model.eval()

    start = time.perf_counter()
    with torch.no_grad():
        q0 = float(eval_fn(model)) if reuse is None else float(reuse.dense["quality"])
    if kind == "quality" and not q0 > 0:
        raise ValueError(f"hf_compress.plan: dense quality is {q0:.4g}, so a quality *ratio* budget is meaningless; "
                         "use {'quality_delta': d} (e.g. with output error) or a size budget.")
    trials = []
    for g in groups.values():
        cands = (candidates or {}).get(g.kind)
        cands = default_candidates(g.kind, calibrated=bool(fit)) if cands is None else list(cands)
        for cfg in cands:
            tgt = target(g, cfg)
            if tgt is not None and (known is None or cfg.registry_name in known):
                trials.append((g, cfg, tgt))
    if not trials:
        raise ValueError(f"hf_compress.plan: no candidate applies to {type(model).__name__} with methods="
                         f"{list(methods or [])}; known groups: {list(groups)}.")

    if reuse is not None:
        table = [dict(r) for r in reuse.table]
    else:
        table = _measure(model, trials, fit, eval_fn, q0, sign, dense_bytes, float_bytes, progress)
    options: dict[str, list[dict[str, Any]]] = {}
    for row in table:
        if row["bytes_saved"] > 0 and (known is None or row["method"] in known):
            options.setdefault(row["group"], []).append(row)

    path = _greedy(options, dense_bytes, q0, sign, kind, limit)
    if kind == "bytes" and (not path or path[-1]["bytes"] > limit):
        least = path[-1]["bytes"] if path else dense_bytes
        raise ValueError(f"hf_compress.plan: the size budget ({limit / 1e6:.3f} MB) is out of reach of the "
                         f"candidates: the smallest plan found is {least / 1e6:.3f} MB ({least / dense_bytes:.3f} of "
                         "dense). Give a larger budget or more aggressive candidates.")
    steps = [{}] + [s["choice"] for s in path]
    k = len(steps) - 1
    while True:
        chosen = {gk: options[gk][i] for gk, i in steps[k].items()}
        config = CompressionConfig(modules={o["pattern"]: MethodConfig.from_dict(o["config"])
                                            for o in chosen.values()})
        compressed = copy.deepcopy(model)
        if config.modules:
            compress(compressed, config, calibration=fit, progress=False)
        q = float(eval_fn(compressed.eval()))
        if kind == "bytes" or k == 0 or _within(q, q0, sign, kind, limit):
            break
        k -= 1
    result = {"bytes": model_bytes(compressed, float_bytes), "quality": q,
              "predicted_quality": path[k - 1]["predicted_quality"] if k else q0, "steps": k,
              "seconds": round(time.perf_counter() - start, 1)}
    result["bytes_ratio"] = result["bytes"] / dense_bytes
    result["quality_ratio"] = q / q0 if q0 else math.nan
    model.train(was_training)
    return PlanResult(config=config, table=table, path=path, dense={"bytes": dense_bytes, "quality": q0},
                      result=result, chosen={gk: o["candidate"] for gk, o in chosen.items()},
                      budget={"kind": kind, "limit": limit}, groups={k_: g.modules for k_, g in groups.items()},
                      model=compressed if keep_model else None)


def _measure(model: nn.Module, trials: list[tuple[Group, MethodConfig, tuple[str, list[str]]]], fit: Any,
             eval_fn: Callable[[nn.Module], float], q0: float, sign: float, dense_bytes: int,
             float_bytes: int | None, progress: bool) -> list[dict[str, Any]]:
    """One row per trial: the group compressed alone with the candidate, its quality and bytes saved."""
    table: list[dict[str, Any]] = []
    bar = tqdm(total=len(trials), desc="hf_compress.plan", disable=not progress)
    swappers: dict[tuple[str, str], LayerSwapper] = {}
    for g, cfg, (pattern, names) in trials:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if isinstance(cfg, LowRankConfig) and cfg.method in ("svd", "whitened", "asvd"):
                sw_key = (g.key, cfg.method)
                if sw_key not in swappers:
                    same = [c for _, c, _ in trials if isinstance(c, LowRankConfig) and c.method == cfg.method]
                    swappers[sw_key] = LayerSwapper(model, names, same, fit)
                undo = swappers[sw_key].apply(dict.fromkeys(names, cfg))
                try:
                    q, b = float(eval_fn(model)), model_bytes(model, float_bytes)
                finally:
                    swappers[sw_key].restore(undo)
            else:
                trial = copy.deepcopy(model)
                try:
                    compress(trial, CompressionConfig(modules={pattern: cfg}), calibration=fit, progress=False)
                except BudgetError:  # this size is out of the method's reach on this module: not a candidate
                    bar.update(1)
                    continue
                q, b = float(eval_fn(trial.eval())), model_bytes(trial, float_bytes)
                del trial
        row = {"group": g.key, "kind": g.kind, "modules": len(names), "candidate": label(cfg),
               "method": cfg.registry_name, "config": cfg.to_dict(), "pattern": pattern,
               "bytes_saved": dense_bytes - b, "quality": q, "cost": _cost(q, q0, sign),
               "seconds": round(time.perf_counter() - t0, 2)}
        row["cost_per_mb"] = row["cost"] / max(row["bytes_saved"], 1) * 1e6
        table.append(row)
        bar.update(1)
        bar.set_postfix_str(f"{g.key[-30:]} {label(cfg)}")
    bar.close()
    return table


def _greedy(options: dict[str, list[dict[str, Any]]], total: int, q0: float, sign: float, kind: str,
            limit: float) -> list[dict[str, Any]]:
    """Multiple-choice greedy over ``options`` (group -> measured candidates): take the move with the least
    added quality cost per extra byte saved (costs assumed additive) until ``bytes <= limit``, or while the predicted
    quality stays within a quality budget. Returns the steps ``{"bytes", "predicted_quality", "choice"}``."""
    current: dict[str, int] = {}
    saved, cost, path = 0, 0.0, []
    while kind != "bytes" or total - saved > limit:
        best = None
        for g, opts in options.items():
            cur = opts[current[g]] if g in current else {"bytes_saved": 0, "cost": 0.0}
            for i, o in enumerate(opts):
                gain = o["bytes_saved"] - cur["bytes_saved"]
                if gain > 0:
                    rate = (o["cost"] - cur["cost"]) / gain
                    if best is None or (rate, -gain) < (best[0], -best[3]):
                        best = (rate, g, i, gain, o["cost"] - cur["cost"])
        if best is None:
            break
        _, g, i, gain, d = best
        predicted = _predict(q0, cost + d, sign)
        if kind != "bytes" and not _within(predicted, q0, sign, kind, limit):
            break
        current[g] = i
        saved, cost = saved + gain, cost + d
        path.append({"step": len(path) + 1, "bytes": total - saved, "bytes_ratio": (total - saved) / total,
                     "predicted_quality": predicted, "added": f"{g} -> {options[g][i]['candidate']}",
                     "choice": dict(current)})
    if kind == "bytes" and path and total - saved <= limit:
        path += _walk_back(options, current, total, saved, cost, q0, sign, limit)
        for n, step in enumerate(path, 1):
            step["step"] = n
    return path


def _walk_back(options: dict[str, list[dict[str, Any]]], current: dict[str, int], total: int, saved: int,
               cost: float, q0: float, sign: float, limit: float) -> list[dict[str, Any]]:
    """After the greedy met a size budget (its last move often saves more than needed): :func:`walk_back`.
    Returns the extra path steps."""
    return [{"step": 0, "bytes": left, "bytes_ratio": left / total, "predicted_quality": _predict(q0, c, sign),
             "added": f"{g} -> {options[g][i]['candidate'] if i >= 0 else 'dense'} (walk back)",
             "choice": dict(current)}
            for g, i, left, c in walk_back(options, current, total - saved, cost, limit)]


def walk_back(options: dict[str, list[dict[str, Any]]], current: dict[str, int], left: float, cost: float,
              limit: float, size_key: str = "bytes_saved", cost_key: str = "cost",
              clip: bool = False) -> Iterator[tuple[str, int, float, float]]:
    """Repeatedly take the one change (a group to a milder option, or back to dense: index -1) that lowers the
    predicted cost most while the plan's size ``left`` stays ``<= limit``; updates ``current`` (group -> option
    index) and yields ``(group, index, left, cost)`` after each change. ``clip``: negative costs count as 0."""
    def c(o: dict[str, Any]) -> float:
        return max(o[cost_key], 0.0) if clip else o[cost_key]

    while True:
        best = None
        for g, opts in options.items():
            cur = opts[current[g]] if g in current else None
            for i, o in [(-1, None), *enumerate(opts)]:
                relief = (c(cur) if cur else 0.0) - (c(o) if o else 0.0)
                loss = (cur[size_key] if cur else 0) - (o[size_key] if o else 0)
                if relief > 1e-12 and left + loss <= limit and (best is None or relief > best[0]):
                    best = (relief, g, i, loss)
        if best is None:
            return
        relief, g, i, loss = best
        if i < 0:
            current.pop(g)
        else:
            current[g] = i
        left, cost = left + loss, cost - relief
        yield g, i, left, cost


def _predict(q0: float, cost: float, sign: float) -> float:
    return q0 * math.exp(sign * cost) if q0 > 0 else q0 + sign * cost
