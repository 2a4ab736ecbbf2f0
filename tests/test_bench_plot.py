"""``benchmarks.plot``: one PNG per results file, a latency panel only where the suite timed something."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.plot import plot_file


def _doc(latency: bool) -> dict:
    records = []
    for model, metric in (("m-lm", "ppl"), ("m-asr", "wer")):
        for method, params, q in (("dense", 100, 1.0), ("a", 80, 1.5), ("a", 60, 2.0)):
            rec = {"model": model, "method": method, "quality": {metric: q}, "size": {"params": params}}
            if latency:
                rec["latency"] = {"forward_s": params / 100}
                rec["ratios"] = {"forward_s": params / 1000}  # the panel plots the ratio to dense
            records.append(rec)
    return {"suite": "t", "created": "now", "records": records}


@pytest.mark.parametrize("latency, panels", [(True, 2), (False, 1)])
def test_plot_draws_a_latency_panel_only_when_timed(tmp_path: Path, latency: bool, panels: int) -> None:
    import matplotlib.image

    path = tmp_path / "r.json"
    path.write_text(json.dumps(_doc(latency)))
    out = plot_file(path)
    height, width = matplotlib.image.imread(out).shape[:2]
    assert out == tmp_path / "r.png"
    assert width == pytest.approx(5.5 * panels * 110, abs=2)  # 5.5 in per panel at 110 dpi
    assert height == pytest.approx(2 * 4 * 110, abs=2)  # one row per model


def test_plot_skips_files_without_plottable_records(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"suite": "t", "records": [{"model": "m", "method": "dense", "quality": {}}]}))
    assert plot_file(path) is None
    assert not (tmp_path / "r.png").exists()


def test_table_prefers_paired_latency_and_names_each_run_budget(tmp_path: Path) -> None:
    from benchmarks.report import rows

    records = [
        {"model": "m", "method": "paired", "run": "r1", "ratios": {"forward_s": 0.2},
         "extra": {"forward_ratio_vs_dense_paired": 0.9}},
        {"model": "m", "method": "unpaired", "run": "r2", "ratios": {"forward_s": 0.2}},
    ]
    doc = {"budget": {"r1": {"default": {}}, "r2": {"quick": {}}}, "records": records}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    table = rows(tmp_path)[2:]
    assert table[0].split(" | ")[1] == "default" and table[0].endswith("| 0.9 |")
    assert table[1].split(" | ")[1] == "quick" and table[1].endswith("| 0.2* |")


def test_paired_latency_gives_per_round_ratios_to_the_first_model() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import ARCHS, tiny_model

    from benchmarks.harness import paired_latency

    model = tiny_model(ARCHS[0])
    out = paired_latency({"dense": model, "same": model}, budget="quick", rounds=3)
    assert set(out["dense"]) == {"forward_s", "decode_tokens_per_s"}
    assert set(out["same"]) == {"forward_s", "decode_tokens_per_s", "forward_ratio", "decode_ratio"}
    assert out["same"]["forward_ratio"] > 0 and out["same"]["decode_ratio"] > 0
