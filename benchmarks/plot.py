"""``python -m benchmarks plot``: quality-vs-size (and, where timed, quality-vs-latency) PNGs for every results JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .harness import RESULTS_DIR

# y-axis metric candidates in order of preference, with "lower is better"
METRICS = [("ppl", True), ("wer", True), ("lee50_spearman", False), ("polarity_accuracy", False)]


def _primary(records: list[dict[str, Any]]) -> tuple[str, bool] | None:
    for name, lower in METRICS:
        if any(name in (r.get("quality") or {}) for r in records):
            return name, lower
    return None


def plot_file(path: Path) -> Path | None:
    """Draw one PNG beside ``path``; returns its path, or None when the file has no plottable records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(path.read_text())
    records = [r for r in doc.get("records", []) if r.get("quality") and r.get("size", {}).get("params")]
    models = sorted({r["model"] for r in records})
    if not records:
        return None
    # (record section, x key, axis label); suites that time nothing get no empty latency panel
    panels = [("size", "params", "parameters")]
    if any((r.get("latency") or {}).get("forward_s") is not None for r in records):
        panels.append(("latency", "forward_s", "forward latency (s)"))
    fig, axes = plt.subplots(len(models), len(panels), figsize=(5.5 * len(panels), 4 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        recs = [r for r in records if r["model"] == model]
        metric = _primary(recs)
        if metric is None:
            continue
        name, lower = metric
        for ax, (section, xkey, xlabel) in zip(row, panels):
            methods = sorted({r["method"] for r in recs})
            for method in methods:
                pts = [((r.get(section) or {}).get(xkey), r["quality"].get(name))
                       for r in recs if r["method"] == method]
                pts = sorted(p for p in pts if p[0] is not None and p[1] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o", label=method)
            ax.set_xlabel(xlabel)
            ys = [r["quality"].get(name) for r in recs if isinstance(r["quality"].get(name), (int, float))]
            if name == "ppl" and ys and min(ys) > 0 and max(ys) / min(ys) > 20:
                ax.set_yscale("log")  # perplexities span orders of magnitude; a linear axis hides the good ones
            ax.set_ylabel(f"{name} ({'lower' if lower else 'higher'} is better)")
            ax.set_title(f"{model}: {name} vs {xlabel}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{doc.get('suite')} ({doc.get('created', '')})")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_all(results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Plot every ``*.json`` in ``results_dir``; returns the PNG paths written."""
    written = []
    for path in sorted(results_dir.glob("*.json")):
        out = plot_file(path)
        if out is not None:
            written.append(out)
    return written
