"""Design-space sweep for low-rank plans: per-group sensitivity, then a greedy budgeted search.

``sweep(model, candidates, ranks, calibration, eval_fn, budget)`` compresses one group of layers at a time
(a candidate pattern, or a single module with ``group_by="module"``) at each candidate size, measures the quality
change, and greedily combines the cheapest (quality lost per parameter saved) choices until a parameter budget is
met or a quality budget would be exceeded. The chosen plan is evaluated for real. ``model`` is restored.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import as_batches, keeps_training_mode
from .compress import CompressionContext
from .config import CompressionConfig, matches
from .evaluation import output_error_fn, perplexity_fn, random_batches, text_batches  # noqa: F401  (public here)
from .layers.common import linear_weight_and_bias
from .layers.lowrank import LowRankLinear
from .methods.lowrank import LowRankConfig, calibration_statistics, layer_spectrum, resolve_rank
from .registry import get_method


class JsonResult:
    """``to_json(path=None)``: the result's ``to_dict()`` as indented JSON, also written to ``path`` if given."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text


@dataclass
class SweepResult(JsonResult):
    """``table``: one row per (group, size) with the measured quality change; ``path``: the greedy steps with
    predicted quality; ``pareto``: evaluated points ``{params, quality, latency_s, pareto}``; ``config``: the plan."""

    dense: dict[str, Any]
    table: list[dict[str, Any]]
    path: list[dict[str, Any]]
    pareto: list[dict[str, Any]]
    chosen: dict[str, Any]
    config: CompressionConfig
    groups: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"dense": self.dense, "chosen": self.chosen, "config": self.config.to_dict(), "table": self.table,
                "path": self.path, "pareto": self.pareto, "groups": self.groups}


    def format_table(self) -> str:
        """The sensitivity table as aligned text (group, size, params saved, quality, delta)."""
        lines = [f"{'group':40s} {'size':>10s} {'saved':>10s} {'quality':>10s} {'delta':>10s}"]
        for r in self.table:
            lines.append(f"{r['group'][:40]:40s} {r['size']:>10s} {r['params_saved']:>10d} "
                         f"{r['quality']:>10.4g} {r['delta']:>+10.4g}")
        return "\n".join(lines)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def candidate_groups(model: nn.Module, candidates: Sequence[str], group_by: str = "pattern") -> dict[str, list[str]]:
    """Group key -> linear module names. A module belongs to the first candidate pattern matching it."""
    if group_by not in ("pattern", "module"):
        raise ValueError(f"hf_compress.sweep: group_by must be 'pattern' or 'module', got {group_by!r}.")
    groups: dict[str, list[str]] = {}
    taken: set[str] = set()
    for pattern in candidates:
        CompressionConfig(modules={pattern: LowRankConfig(rank=1)})  # validates the regex with a clear error
        names = [n for n, m in model.named_modules() if n not in taken and _is_linear(m) and matches(pattern, n)]
        if not names:
            raise ValueError(f"hf_compress.sweep: candidate pattern {pattern!r} matches no linear layer of "
                             f"{type(model).__name__}; check `[n for n, _ in model.named_modules()]`.")
        taken.update(names)
        if group_by == "pattern":
            groups[pattern] = names
        else:
            groups.update({re.escape(n): [n] for n in names})
    return groups


_SIZE_FIELDS = ("rank", "rank_ratio", "energy", "tucker_ranks")  # what candidate sizes may differ in


def _size_configs(ranks: Sequence[float | LowRankConfig], method: str) -> list[LowRankConfig]:
    if not ranks:
        raise ValueError("hf_compress.sweep: give at least one candidate size in `ranks` (e.g. [0.25, 0.5]).")
    out = [r if isinstance(r, LowRankConfig) else LowRankConfig(method=method, rank_ratio=float(r)) for r in ranks]
    if len({c.method for c in out}) != 1:
        raise ValueError("hf_compress.sweep: all candidate sizes must use one method; run one sweep per method.")
    for c in out:  # the sweep sizes each layer on its own from one spectrum: these options would not be applied
        if c.allocation != "uniform" or c.sequential:
            raise ValueError(f"hf_compress.sweep: candidate {_label(c)} sets allocation={c.allocation!r} / "
                             f"sequential={c.sequential}; the sweep sizes and measures each layer group on its own "
                             "from dense statistics, so its figures would not match the plan. Sweep with the "
                             "defaults, or compress() with these options and evaluate that plan.")
    settings = {tuple((k, v) for k, v in c.to_dict().items() if k not in _SIZE_FIELDS) for c in out}
    if len(settings) > 1:
        raise ValueError("hf_compress.sweep: candidate sizes differ in more than their size (rank, rank_ratio, "
                         "energy, tucker_ranks), e.g. damping or alpha; the sweep computes one spectrum per layer "
                         "from the first candidate, so give them equal settings.")
    return out



def _label(cfg: LowRankConfig) -> str:
    for key in ("rank_ratio", "rank", "energy", "tucker_ranks"):
        if getattr(cfg, key) is not None:
            return f"{cfg.method}:{getattr(cfg, key)}"
    return cfg.method


class LayerSwapper:
    """Builds compressed replacements (reusing cached spectra) and swaps them in and out of ``model``."""

    def __init__(self, model: nn.Module, names: list[str], configs: list[LowRankConfig], calibration: Any) -> None:
        self.model, self.spectra, self.energy = model, {}, {}  # energy: each layer's full Σ s² (before truncation)
        calibrated = [c for c in configs if c.method in ("whitened", "asvd")]
        if calibrated:
            cfg = calibrated[0]
            for name, stat in calibration_statistics(model, dict.fromkeys(names, cfg), calibration):
                self._add(name, layer_spectrum(model.get_submodule(name), cfg, stat, name), configs)
        elif any(c.method == "svd" for c in configs):
            for name in names:
                self._add(name, layer_spectrum(model.get_submodule(name), configs[0], None, name), configs)

    def _add(self, name: str, spec: Any, configs: list[LowRankConfig]) -> None:
        self.energy[name] = float((spec.s.double() ** 2).sum())
        self.spectra[name] = self._keep(spec, configs)

    @staticmethod
    def _keep(spec: Any, configs: list[LowRankConfig]) -> Any:
        """Truncate a spectrum to the largest rank any candidate needs (float32) to bound memory."""
        m, n = spec.u.shape[0], spec.vt.shape[1]
        if any(c.energy is not None for c in configs):
            need = spec.s.numel()
        else:
            need = max(min(c.rank_for(m, n), spec.s.numel()) for c in configs if c.method != "tucker")
        spec = spec.truncate(need)
        spec.u, spec.s, spec.vt = spec.u.float(), spec.s.float(), spec.vt.float()
        return spec

    def apply(self, assignment: dict[str, LowRankConfig]) -> list[tuple[str, nn.Module]]:
        """Swap in compressed layers; returns ``[(name, original)]`` for :meth:`restore`. If one fails, the layers
        already swapped are restored before the error propagates."""
        undo: list[tuple[str, nn.Module]] = []
        try:
            self._swap(assignment, undo)
        except BaseException:
            self.restore(undo)
            raise
        return undo

    def _swap(self, assignment: dict[str, LowRankConfig], undo: list[tuple[str, nn.Module]]) -> None:
        for name, cfg in assignment.items():
            module = self.model.get_submodule(name)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # sizes that save nothing are simply skipped
                if name in self.spectra and cfg.method != "tucker":
                    weight, bias = linear_weight_and_bias(module, name)
                    spec = self.spectra[name]
                    rank = resolve_rank(name, cfg, *weight.shape, spec)
                    new = None if rank is None else LowRankLinear.from_spectrum(spec, rank, bias, weight.dtype)
                else:
                    ctx = CompressionContext(self.model, name)
                    new = get_method(cfg.registry_name).compress(module, cfg, ctx)
            if new is not None:
                self.model.set_submodule(name, new)
                undo.append((name, module))

    def restore(self, undo: list[tuple[str, nn.Module]]) -> None:
        for name, module in reversed(undo):
            self.model.set_submodule(name, module)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@keeps_training_mode
def sweep(
    model: nn.Module,
    candidates: Sequence[str],
    ranks: Sequence[float | LowRankConfig],
    calibration: Sequence[Any] | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    budget: float | dict[str, float] | None = None,
    *,
    method: str = "svd",
    group_by: str = "pattern",
    higher_is_better: bool = False,
    latency_fn: Callable[[nn.Module], float] | None = None,
    path_evals: int = 0,
    progress: bool = True,
) -> SweepResult:
    """Measure per-group sensitivity and search a plan meeting ``budget``.

    Args:
        model: a dense model (restored before returning).
        candidates: module-name patterns (see ``CompressionConfig``); each is a group unless ``group_by="module"``.
        ranks: candidate sizes: ``rank_ratio`` floats (with ``method``) or ``LowRankConfig`` objects.
        calibration: model input batches for ``whitened`` / ``asvd``.
        eval_fn: ``model -> float`` quality (lower is better unless ``higher_is_better``), e.g. perplexity.
        budget: fraction of the model's parameters to keep (``0.91`` or ``{"params": 0.91}``), or a quality
            budget ``{"quality": 1.05}`` (allowed ratio to dense) / ``{"quality_delta": 0.5}`` (absolute).
        latency_fn: ``model -> seconds``, measured on dense and on evaluated plans.
        path_evals: also evaluate this many evenly spaced points of the greedy path (Pareto data).
    """
    calibration = as_batches(calibration, getattr(getattr(model, "config", None), "vocab_size", None))
    if eval_fn is None:
        raise ValueError("hf_compress.sweep: pass eval_fn (model -> float), e.g. a perplexity function.")
    if budget is None:
        raise ValueError("hf_compress.sweep: pass budget=, e.g. 0.91 (keep 91 % of the parameters) or "
                         "{'quality': 1.05} (stay within 1.05x dense quality).")
    budget = {"params": float(budget)} if isinstance(budget, (int, float)) else dict(budget)
    if len(budget) != 1 or next(iter(budget)) not in ("params", "quality", "quality_delta"):
        raise ValueError("hf_compress.sweep: budget must be a params fraction (0.91), {'params': f}, "
                         f"{{'quality': ratio}} or {{'quality_delta': d}}; got {budget!r}.")
    kind, limit = next(iter(budget.items()))
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or \
            (kind == "params" and not 0 < limit <= 1) or (kind == "quality" and limit < 1) or \
            (kind == "quality_delta" and limit <= 0):
        raise ValueError(f"hf_compress.sweep: a {kind} budget must be {_BUDGET_RANGES[kind]}, got {limit!r}.")
    sign = -1.0 if higher_is_better else 1.0
    groups = candidate_groups(model, candidates, group_by)
    configs = _size_configs(ranks, method)
    was_training = model.training
    model.eval()
    swapper = LayerSwapper(model, [n for g in groups.values() for n in g], configs, calibration)
    total = _params(model)

    def measure(assignment: dict[str, LowRankConfig], timing: bool = False) -> dict[str, Any]:
        undo = swapper.apply(assignment)
        try:
            with torch.no_grad():
                q = float(eval_fn(model))
            lat = float(latency_fn(model)) if timing and latency_fn else None
            return {"params": _params(model), "quality": q, "latency_s": lat}
        finally:
            swapper.restore(undo)

    start = time.perf_counter()
    dense = measure({}, timing=True)
    table: list[dict[str, Any]] = []
    options: dict[str, list[dict[str, Any]]] = {}
    for gi, (key, names) in enumerate(groups.items()):
        for cfg in configs:
            r = measure(dict.fromkeys(names, cfg))
            row = {"group": key, "modules": len(names), "size": _label(cfg), "config": cfg.to_dict(),
                   "params_saved": total - r["params"], "quality": r["quality"],
                   "delta": sign * (r["quality"] - dense["quality"])}
            row["delta_per_mparam"] = row["delta"] / max(row["params_saved"], 1) * 1e6
            table.append(row)
            if row["params_saved"] > 0:
                options.setdefault(key, []).append({**row, "cfg": cfg})
        if progress:
            print(f"[sweep] group {gi + 1}/{len(groups)} {key}: {time.perf_counter() - start:.0f}s", flush=True)

    path = _greedy(options, total, dense["quality"], sign, kind, limit)
    chosen_steps = path[-1]["choice"] if path else {}
    assignment = {n: options[g][i]["cfg"] for g, i in chosen_steps.items() for n in groups[g]}
    result = measure(assignment, timing=True)
    if kind != "params":  # back off while the real quality misses the quality budget
        for step in reversed(path[:-1]):
            if _within(result["quality"], dense["quality"], sign, kind, limit):
                break
            chosen_steps = step["choice"]
            assignment = {n: options[g][i]["cfg"] for g, i in chosen_steps.items() for n in groups[g]}
            result = measure(assignment, timing=True)
    points = [{"source": "dense", **dense}, {"source": "chosen", **result}]
    for step in _spaced(path[:-1], path_evals):
        a = {n: options[g][i]["cfg"] for g, i in step["choice"].items() for n in groups[g]}
        points.append({"source": f"path step {step['step']}", **measure(a, timing=True)})
    for row in table:
        points.append({"source": f"{row['group']} @ {row['size']}", "params": total - row["params_saved"],
                       "quality": row["quality"], "latency_s": None})
    _mark_pareto(points, sign)
    plan = _plan(model, groups, {g: options[g][i]["cfg"] for g, i in chosen_steps.items()})
    chosen = {**result, "params_ratio": result["params"] / total, "quality_ratio": result["quality"] /
              dense["quality"] if dense["quality"] else math.nan, "groups": {g: _label(options[g][i]["cfg"])
                                                                             for g, i in chosen_steps.items()}}
    if dense.get("latency_s") and result.get("latency_s"):
        chosen["latency_ratio"] = result["latency_s"] / dense["latency_s"]
    if kind == "params":
        chosen["budget_met"] = chosen["params_ratio"] <= limit
        if not chosen["budget_met"]:
            warnings.warn(f"hf_compress.sweep: the candidates cannot reach the params budget {limit}: the smallest "
                          f"plan keeps {chosen['params_ratio']:.3f} of the parameters (chosen['budget_met'] is "
                          "False); add smaller sizes or more candidate layers.", UserWarning, stacklevel=2)
    chosen["sweep_seconds"] = round(time.perf_counter() - start, 1)
    model.train(was_training)
    for step in path:
        step["choice"] = {g: _label(options[g][i]["cfg"]) for g, i in step["choice"].items()}
    return SweepResult({**dense, "total_params": total}, table, path, points, chosen, plan, groups)


_BUDGET_RANGES = {"params": "a fraction in (0, 1]", "quality": "a ratio to dense quality >= 1",
                  "quality_delta": "a change > 0"}


def _within(q: float, q0: float, sign: float, kind: str, limit: float) -> bool:
    delta = sign * (q - q0)
    return delta <= limit if kind == "quality_delta" else delta <= abs(q0) * (limit - 1.0)


def _greedy(options: dict[str, list[dict[str, Any]]], total: int, q0: float, sign: float, kind: str,
            limit: float) -> list[dict[str, Any]]:
    """Multiple-choice greedy: repeatedly take the move with the least predicted quality loss per extra parameter
    saved (deltas assumed additive), until the parameter budget is met or the quality budget would be passed; a met
    parameter budget is then walked back (:func:`hf_compress.planning.walk_back`)."""
    current: dict[str, int] = {}
    saved, delta, path = 0, 0.0, []
    for opts in options.values():
        opts.sort(key=lambda o: o["params_saved"])
    while kind != "params" or total - saved > limit * total:
        best = None
        for g, opts in options.items():
            cur = opts[current[g]] if g in current else {"params_saved": 0, "delta": 0.0}
            for i, o in enumerate(opts):
                gain = o["params_saved"] - cur["params_saved"]
                if gain <= 0:
                    continue
                cost = (max(o["delta"], 0.0) - max(cur["delta"], 0.0)) / gain
                if best is None or cost < best[0]:
                    best = (cost, g, i, gain, max(o["delta"], 0.0) - max(cur["delta"], 0.0))
        if best is None:
            break
        _, g, i, gain, d = best
        if kind != "params" and not _within(q0 + sign * (delta + d), q0, sign, kind, limit):
            break
        current[g] = i
        saved, delta = saved + gain, delta + d
        path.append({"step": len(path) + 1, "params": total - saved, "params_ratio": (total - saved) / total,
                     "predicted_quality": q0 + sign * delta, "choice": dict(current)})
    if kind == "params" and path and total - saved <= limit * total:  # the last move may save more than needed
        from .planning import walk_back

        for _g, _i, left, d in walk_back(options, current, total - saved, delta, limit * total, "params_saved",
                                         "delta", clip=True):
            path.append({"step": len(path) + 1, "params": left, "params_ratio": left / total,
                         "predicted_quality": q0 + sign * d, "choice": dict(current), "walk_back": True})
    return path


def _spaced(path: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    if k <= 0 or not path:
        return []
    idx = sorted({round(j * (len(path) - 1) / max(k - 1, 1)) for j in range(k)}) if k > 1 else [len(path) // 2]
    return [path[i] for i in idx]


def _mark_pareto(points: list[dict[str, Any]], sign: float) -> None:
    for p in points:
        p["pareto"] = not any(o is not p and o["params"] <= p["params"] and sign * o["quality"] <= sign * p["quality"]
                              and (o["params"] < p["params"] or sign * o["quality"] < sign * p["quality"])
                              for o in points)


def _plan(model: nn.Module, groups: dict[str, list[str]], chosen: dict[str, LowRankConfig]) -> CompressionConfig:
    """A plan compressing exactly the chosen groups' modules (per-module patterns if group patterns overlap)."""
    want = {n: cfg for g, cfg in chosen.items() for n in groups[g]}
    plan = CompressionConfig(modules=dict(chosen))
    got = {n: plan.method_for(n)[1] for n, m in model.named_modules() if _is_linear(m) and plan.method_for(n)}
    if got.keys() == want.keys() and all(got[n] is want[n] for n in want):
        return plan
    return CompressionConfig(modules={rf"^{re.escape(n)}": cfg for n, cfg in want.items()})


class _CallableModule(types.ModuleType):
    """``import hf_compress.sweep`` binds this module to ``hf_compress.sweep``; keep that name callable."""

    def __call__(self, *args: Any, **kwargs: Any) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
