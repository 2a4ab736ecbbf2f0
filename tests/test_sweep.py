"""``hf_compress.sweep`` and ``hf-compress sweep``: sensitivity table, budgeted plan, Pareto data, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, tiny_model

import hf_compress
from hf_compress import CompressionConfig
from hf_compress.sweep import output_error_fn, random_batches

LLAMA = ARCHS[0]
PATTERNS = {"llama": ["q_proj", "o_proj", "mlp.up_proj", "mlp.down_proj"], "gpt2": ["attn.c_attn", "mlp.c_fc"],
            "bert": ["attention.self.query", "intermediate.dense"], "whisper": ["fc1", "fc2", "self_attn.q_proj"]}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_params_budget_plan_is_met_and_reproducible(arch) -> None:
    model = tiny_model(arch)
    batches, calib = random_batches(model, n=2, seq=8), random_batches(model, n=3, seq=16, seed=5)
    ref = output_error_fn(model, batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = hf_compress.sweep(model, PATTERNS[arch.name], [0.25, 0.5], calibration=calib,
                               eval_fn=output_error_fn(model, batches), budget=0.95, method="whitened",
                               progress=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert ref(model) == 0.0  # the model is restored
    assert len(result.table) == 2 * len(PATTERNS[arch.name])
    assert all({"group", "size", "params_saved", "quality", "delta"} <= set(r) for r in result.table)
    assert result.chosen["params_ratio"] <= 0.95 and result.chosen["quality"] > 0
    assert any(p["pareto"] for p in result.pareto) and result.pareto[0]["source"] == "dense"
    plan = CompressionConfig.from_json(result.config.to_json())
    again = tiny_model(arch)
    hf_compress.compress(again, plan, calibration=calib, progress=False)
    assert _params(again) == result.chosen["params"]
    error = output_error_fn(tiny_model(arch), batches)(again)
    assert error == pytest.approx(result.chosen["quality"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize(("size", "match"), [
    (lambda: hf_compress.LowRankConfig(rank_ratio=0.5, allocation="global"), r"allocation='global'"),
    (lambda: hf_compress.LowRankConfig(method="whitened", rank_ratio=0.5, sequential=True), r"sequential=True"),
])
def test_options_the_sweep_cannot_apply_are_refused(size, match: str) -> None:
    """The sweep sizes each layer on its own from one dense spectrum; a global allocation or sequential
    calibration would give a plan whose size and quality differ from what the sweep reported."""
    model = tiny_model(LLAMA)
    with pytest.raises(ValueError, match=match):
        hf_compress.sweep(model, PATTERNS["llama"], [size()], calibration=random_batches(model, n=2, seq=8),
                          eval_fn=output_error_fn(model, random_batches(model, n=1, seq=8)), budget=0.95,
                          progress=False)
    with pytest.raises(ValueError, match="differ in more than their size"):
        hf_compress.sweep(model, PATTERNS["llama"], [hf_compress.LowRankConfig(method="whitened", rank_ratio=0.5),
                                                     hf_compress.LowRankConfig(method="whitened", rank_ratio=0.25,
                                                                               damping=0.1)],
                          eval_fn=output_error_fn(model, random_batches(model, n=1, seq=8)), budget=0.95,
                          progress=False)


def test_a_failing_candidate_restores_the_model_and_an_unreachable_budget_is_flagged() -> None:
    model = tiny_model(LLAMA)
    batches = random_batches(model, n=1, seq=8)
    ref = output_error_fn(model, batches)
    with pytest.raises(ValueError, match="exceeds"):  # rank 33 fits gate_proj (64 x 96) but not k_proj (64 x 32)
        hf_compress.sweep(model, [r"layers\.0\.mlp\.gate_proj|layers\.1\.self_attn\.k_proj"],
                          [hf_compress.LowRankConfig(rank=33)], eval_fn=output_error_fn(model, batches),
                          budget=0.95, progress=False)
    assert ref(model) == 0.0 and type(model.model.layers[0].mlp.gate_proj) is torch.nn.Linear
    with pytest.warns(UserWarning, match="cannot reach the params budget 0.3"):
        result = hf_compress.sweep(model, PATTERNS["llama"][:1], [0.5], eval_fn=output_error_fn(model, batches),
                                   budget=0.3, progress=False)
    assert result.chosen["budget_met"] is False and result.chosen["params_ratio"] > 0.3


def test_output_error_sees_the_pooler_of_an_encoder() -> None:
    bert = next(a for a in ARCHS if a.name == "bert")
    model = tiny_model(bert)
    fn = output_error_fn(model, random_batches(model, n=1, seq=8))
    with torch.no_grad():
        model.pooler.dense.weight.mul_(0.5)  # last_hidden_state unchanged: only the pooled output moves
    assert fn(model) > 0.01


def test_quality_budget_and_greedy_path() -> None:
    model = tiny_model(LLAMA)
    batches = random_batches(model, n=2, seq=8)
    fn = output_error_fn(model, batches)
    result = hf_compress.sweep(model, PATTERNS["llama"], [0.25, 0.5], eval_fn=fn, progress=False,
                               budget={"quality_delta": 0.5}, path_evals=2)
    assert result.chosen["quality"] <= 0.5 or not result.chosen["groups"]
    assert [p["params"] for p in result.path] == sorted((p["params"] for p in result.path), reverse=True)
    assert sum(p["source"].startswith("path step") for p in result.pareto) >= 1
    assert "group" in result.format_table()
    json.loads(result.to_json())


def test_per_module_groups_and_tucker() -> None:
    model = tiny_model(LLAMA)
    fn = output_error_fn(model, random_batches(model, n=1, seq=8))
    result = hf_compress.sweep(model, ["q_proj"], [0.5], eval_fn=fn, budget=0.99, method="tucker",
                               group_by="module", progress=False)
    assert len(result.groups) == LLAMA.make_config().num_hidden_layers
    assert all(len(v) == 1 for v in result.groups.values())
    assert {row["config"]["method"] for row in result.table} == {"tucker"}
    assert {c.method for c in result.config.modules.values()} <= {"tucker"}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"candidates": ["nope_proj"]}, "'nope_proj' matches no linear layer"),
    ({"budget": 1.5}, r"params budget must be a fraction in \(0, 1\], got 1.5"),
    ({"budget": {"quality": 0.5}}, r"quality budget must be a ratio to dense quality >= 1, got 0.5"),
    ({"budget": {"quality": float("nan")}}, r"quality budget must be a ratio to dense quality >= 1, got nan"),
    ({"budget": {"quality_delta": -1}}, r"quality_delta budget must be a change > 0, got -1"),
    ({"budget": {"speed": 2}}, "budget must be a params fraction"),
    ({"eval_fn": None}, "pass eval_fn"),
    ({"ranks": []}, "at least one candidate size"),
    ({"group_by": "layer"}, "group_by must be 'pattern' or 'module'"),
])
def test_bad_inputs(kwargs: dict, match: str) -> None:
    model = tiny_model(LLAMA)
    args = {"candidates": ["q_proj"], "ranks": [0.5], "eval_fn": lambda m: 0.0, "budget": 0.9, **kwargs}
    with pytest.raises(ValueError, match=match):
        hf_compress.sweep(model, progress=False, **args)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hf_compress.cli", *args], capture_output=True, text=True,
                          check=False)


def test_cli_sweep_writes_plan(tmp_path: Path) -> None:
    dense = tmp_path / "dense"
    tiny_model(LLAMA).save_pretrained(dense)
    plan, table = tmp_path / "plan.json", tmp_path / "table.json"
    proc = _cli("sweep", str(dense), "--patterns", "q_proj", "mlp.up_proj", "mlp.down_proj", "--ratios", "0.25",
                "0.5", "--budget", "0.9", "--method", "whitened", "--out", str(plan), "--table", str(table))
    assert proc.returncode == 0, proc.stderr
    assert "chosen: params" in proc.stdout and "wrote plan" in proc.stdout
    cfg = CompressionConfig.from_json(plan)
    assert cfg.modules and all(c.method == "whitened" for c in cfg.modules.values())
    assert json.loads(table.read_text())["chosen"]["params_ratio"] <= 0.9


@pytest.mark.parametrize(("extra", "match"), [
    ([], "exactly one of --budget"),
    (["--budget", "0.9", "--metric", "ppl"], "needs a tokenizer in"),
    (["--budget", "0.9", "--patterns", "zzz"], "matches no linear layer"),
])
def test_cli_sweep_errors(tmp_path: Path, extra: list[str], match: str) -> None:
    dense = tmp_path / "dense"
    tiny_model(LLAMA).save_pretrained(dense)
    args = ["sweep", str(dense), "--patterns", "q_proj", "--ratios", "0.5", "--out", str(tmp_path / "p.json")]
    proc = _cli(*args, *extra)
    assert proc.returncode == 2 and match in proc.stderr


def test_params_budget_walks_back_an_overshooting_last_move() -> None:
    """The greedy's last move (cheapest per parameter) saves far more than the budget needs; the walk back swaps it
    for the milder size of the same group and keeps the plan within the budget."""
    from hf_compress.sweep import _greedy

    options = {"a": [{"params_saved": 30, "delta": 0.03}],
               "b": [{"params_saved": 40, "delta": 0.2}, {"params_saved": 200, "delta": 0.8}]}
    path = _greedy(options, total=1000, q0=1.0, sign=1.0, kind="params", limit=0.95)
    assert [p["choice"] for p in path] == [{"a": 0}, {"a": 0, "b": 1}, {"a": 0, "b": 0}]
    assert path[-1]["params"] == 930 and path[-1]["walk_back"] and path[-1]["params_ratio"] <= 0.95
    assert path[-1]["predicted_quality"] == pytest.approx(1.23)
    tight = _greedy(options, total=1000, q0=1.0, sign=1.0, kind="params", limit=0.78)
    assert tight[-1]["choice"] == {"a": 0, "b": 1}  # nothing can be given back


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_random_probe_batches_follow_a_half_precision_speech_model(dtype: torch.dtype) -> None:
    """The CLI's probe batches for --budget / sweep: fp32 features crashed a bf16/fp16 Whisper's conv."""
    whisper = next(a for a in ARCHS if a.name == "whisper")
    model = tiny_model(whisper).to(dtype)
    batches = random_batches(model, n=2)
    assert all(b["input_features"].dtype == dtype for b in batches)
    fp32 = random_batches(tiny_model(whisper), n=2)
    assert torch.equal(batches[0]["input_features"], fp32[0]["input_features"].to(dtype))  # same seeded values
    assert output_error_fn(model, batches)(model) == 0.0
