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


def rows(results_dir: Path = RESULTS_DIR) -> list[str]:
    """Markdown rows: file, model, method, quality, params, params ratio, disk MB, forward latency ratio."""
    out = ["| results file | model | setting | quality | params | params / dense | disk MB | latency / dense |",
           "|---|---|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        for rec in doc.get("records", []):
            size, ratios = rec.get("size") or {}, rec.get("ratios") or {}
            disk = size.get("disk_bytes")
            out.append(
                f"| `{path.name}` | {rec.get('model')} | {rec.get('method')} | {_quality(rec)} | "
                f"{_fmt(size.get('params'))} | {_fmt(ratios.get('params'))} | "
                f"{_fmt(disk / 1e6) if isinstance(disk, (int, float)) else ''} | {_fmt(ratios.get('forward_s'))} |"
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
