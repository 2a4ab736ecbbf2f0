"""Integration: the benchmark zoo, data and runner on real checkpoints, materialized offline (CI runs these)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig

pytestmark = pytest.mark.integration


def test_calibration_and_eval_text_are_disjoint() -> None:
    from benchmarks import data

    calib, evaluation = data.calibration_text(), data.eval_text()
    assert len(calib) > 200_000 and len(evaluation) > 1_000_000
    calib_lines = {ln.strip() for ln in calib.splitlines() if len(ln.strip()) > 80}
    eval_lines = {ln.strip() for ln in evaluation.splitlines() if len(ln.strip()) > 80}
    assert calib_lines and eval_lines
    assert not calib_lines & eval_lines


def test_minilm_zoo_scores_match_the_published_dense_baseline() -> None:
    """The materialized MiniLM-L6 and the encoder metrics reproduce the known dense figures (REAL_MODELS.md)."""
    from benchmarks import zoo
    from benchmarks.encoder_eval import lee50_spearman, wordsim353_spearman

    model, tok = zoo.load("minilm-l6")
    assert isinstance(model, transformers.BertModel)
    assert lee50_spearman(model, tok) == pytest.approx(0.51, abs=0.03)
    assert wordsim353_spearman(model, tok) == pytest.approx(0.73, abs=0.03)


def test_minilm_compress_on_load_save_reload_exact(tmp_path: Path) -> None:
    from benchmarks import zoo

    path = zoo.resolve("minilm-l6")
    plan = CompressionConfig(modules={r"attention\.self\.(query|key|value)$": LowRankConfig(rank_ratio=0.5)})
    model = hf_compress.AutoCompressedModel.from_pretrained(str(path), compression_config=plan)
    dense = transformers.AutoModel.from_pretrained(str(path))
    n_lowrank = sum(isinstance(m, hf_compress.LowRankLinear) for m in model.modules())
    assert n_lowrank == 3 * dense.config.num_hidden_layers
    model.save_pretrained(tmp_path / "out")
    again = transformers.AutoModel.from_pretrained(str(tmp_path / "out"))
    ids = torch.randint(0, dense.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b, d = (m(input_ids=ids).last_hidden_state for m in (model, again, dense))
    assert torch.equal(a, b)
    assert not torch.equal(a, d)  # it really is compressed


def test_smollm2_runner_end_to_end(tmp_path: Path) -> None:
    """Materialize SmolLM2-135M offline, compress on load, save, reload, measure dense vs compressed."""
    from benchmarks import runner

    plan = runner.PRESETS["lowrank-attn-0.75"]("causal-lm")
    out = tmp_path / "run.json"
    rec = runner.run("smollm2-135m", plan, "lowrank-attn-0.75", budget="quick", save_dir=str(tmp_path / "m"),
                     out=str(out))
    doc = json.loads(out.read_text())
    dense, comp = doc["records"]
    assert dense["method"] == "dense" and comp is not None
    assert 15 < dense["quality"]["ppl"] < 40  # dense SmolLM2 on Wikipedia prose is ~22-24
    assert math.isfinite(comp["quality"]["ppl"]) and comp["quality"]["ppl"] > dense["quality"]["ppl"]
    assert comp["size"]["params"] < dense["size"]["params"]
    assert comp["size"]["disk_bytes"] < dense["size"]["disk_bytes"]
    assert rec["extra"]["reload_identical"] is True
    # Invariant: compress-on-load never holds two dense copies (that would be >= 2x). The 1.3x goal is a benchmark
    # figure (the committed run measured 1.26x; repeated runs here gave 1.20-1.36x: allocator and load-time
    # transients), reported in the results JSON, not a pass/fail threshold for CI.
    assert 0.9 < rec["extra"]["memory"]["peak_over_dense"] < 1.6
    assert doc["machine"]["torch"] == torch.__version__
