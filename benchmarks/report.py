"""``python -m benchmarks table``: the committed results as Markdown, written into ``benchmarks/README.md``.

The table is generated from ``benchmarks/results/*.json`` only (no figure is typed by hand): one row per record,
with its dense reference's figures where the record has ratios.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .harness import RESULTS_DIR

README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"
QUALITY_KEYS = ("ppl", "wer", "lee50_spearman", "polarity_accuracy", "wordsim353_spearman")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _quality(rec: dict[str, Any]) -> str:
    q = rec.get("quality") or {}
    parts = [f"{k} {_fmt(q[k])}" for k in QUALITY_KEYS if k in q]
    parts += [f"{k} {_fmt(v)}" for k, v in q.items() if k.startswith("wer_")]
    return "; ".join(parts)


# Latency ratios measured beside their dense reference (interleaved / just before), best first.
PAIRED_LATENCY = ("forward_ratio_vs_dense_paired", "latency_ratio_vs_dense_now")


def _latency(rec: dict[str, Any]) -> str:
    """The record's forward latency ratio to dense: a paired one where the suite measured it, else the ratio to the
    run's dense record (timed once, earlier in the run) marked ``*``."""
    extra = rec.get("extra") or {}
    paired = next((extra[k] for k in PAIRED_LATENCY if isinstance(extra.get(k), (int, float))), None)
    if paired is not None:
        return _fmt(float(paired))
    value = (rec.get("ratios") or {}).get("forward_s")
    return f"{_fmt(value)}*" if value is not None else ""


# setting fields that tell rows of one method apart (the first few present are shown)
SETTING_KEYS = ("setting", "label", "format", "compression", "bits_per_weight", "target_cut", "assignment",
                "num_subspaces", "whiten", "error_feedback", "sequential", "tied_head", "metric")


def _budget(doc: dict[str, Any], rec: dict[str, Any]) -> str:
    """The evaluation budget of a record: its run's (merged files keep one per run) or the file's, with the fields
    where it differs from the named budget of ``benchmarks.harness.BUDGETS`` (a suite may evaluate fewer
    utterances), and a speaker-adaptation suite's own test-set size."""
    from .harness import BUDGETS

    budget = doc.get("budget") or {}
    if rec.get("run") in budget:
        budget = budget[rec["run"]]
    if not isinstance(budget, dict):
        return ""
    names = []
    for name, fields in budget.items():
        base = BUDGETS.get(name.split("+")[0], {})
        diff = {k: v for k, v in fields.items() if k in base and base[k] != v} if isinstance(fields, dict) else {}
        names.append(name + (f" ({', '.join(f'{k}={v}' for k, v in diff.items())})" if diff else ""))
    own = (rec.get("setting") or {}).get("budget") if isinstance(rec.get("setting"), dict) else None
    if isinstance(own, dict) and "n_test" in own:
        names.append(f"WER on {own['n_test']} test utterances per voice")
    return ", ".join(names)


def _setting(rec: dict[str, Any]) -> str:
    """The method, with the setting fields that tell its rows apart."""
    setting = rec.get("setting") if isinstance(rec.get("setting"), dict) else {}
    shown = [f"{k}={_fmt(setting[k])}" for k in SETTING_KEYS if isinstance(setting.get(k), (str, int, float))][:3]
    return f"{rec.get('method')}" + (f" ({', '.join(shown)})" if shown else "")


def rows(results_dir: Path = RESULTS_DIR) -> list[str]:
    """Markdown rows: file, budget, model, method, quality, params, params ratio, disk MB, forward latency ratio."""
    out = ["| results file | budget | model | setting | quality | params | params / dense | disk MB "
           "| latency / dense |",
           "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        for rec in doc.get("records", []):
            size, ratios = rec.get("size") or {}, rec.get("ratios") or {}
            disk = size.get("disk_bytes")
            out.append(
                f"| `{path.name}` | {_budget(doc, rec)} | {rec.get('model')} | {_setting(rec)} | {_quality(rec)} | "
                f"{_fmt(size.get('params'))} | {_fmt(ratios.get('params'))} | "
                f"{_fmt(disk / 1e6) if isinstance(disk, (int, float)) else ''} | {_latency(rec)} |"
            )
    return out


def write_readme(readme: Path = README, results_dir: Path = RESULTS_DIR) -> Path:
    """Replace the text between the results-table markers of ``readme`` with the current table."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"benchmarks.report: {readme} lacks the {BEGIN} / {END} markers.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + "\n".join(rows(results_dir)) + "\n" + END + tail)
    return readme
