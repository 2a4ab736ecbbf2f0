"""``hf_compress.plan``: mixed-method plans from measured sensitivity, on tiny random models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ARCHS, Arch, model_output, tiny_model

import hf_compress
from hf_compress import CompressionConfig, compress
from hf_compress.methods.adaptwin import ProductTwinConfig
from hf_compress.methods.jlcm import CodebookConfig
from hf_compress.methods.lowrank import LowRankConfig
from hf_compress.methods.tt_embedding import TTEmbeddingConfig
from hf_compress.planning import PlanResult, find_groups, model_bytes, plan

LLAMA, WHISPER = ARCHS[0], ARCHS[3]
# a small candidate set covering every method kind (the defaults try more sizes; slower on a shared CPU)
CANDIDATES = {
    "embedding": [TTEmbeddingConfig(format="adaptive", compression=2.0)],
    "attention": [ProductTwinConfig(rank_ratio=0.5, whiten=True), CodebookConfig(bits=4, method="kmeans",
                                                                                   kmeans_iters=4)],
    "linear": [LowRankConfig(method="whitened", rank_ratio=0.5), CodebookConfig(bits=4, method="kmeans",
                                                                                kmeans_iters=4)],
}


def calibration(arch: Arch, n: int = 6) -> list[Any]:
    """``n`` single-sample batches: token ids ``[1, 16]`` or Whisper dicts with an 8-token transcript."""
    g = torch.Generator().manual_seed(1)
    if arch.name == "whisper":
        out = [{k: v[:1] for k, v in arch.inputs(batch=1, seed=s).items()} for s in range(n)]
        for b in out:
            b["decoder_input_ids"] = torch.randint(0, 96, (1, 8), generator=g)
        return out
    return [arch.inputs(batch=1, seq=16, seed=s)["input_ids"] for s in range(n)]


@pytest.fixture(scope="module", params=[LLAMA, WHISPER], ids=["llama", "whisper"])
def planned(request: pytest.FixtureRequest) -> tuple[Arch, torch.nn.Module, PlanResult]:
    arch = request.param
    model = tiny_model(arch)
    return arch, model, plan(model, 0.6, calibration(arch), candidates=CANDIDATES, keep_model=True, progress=False)


def test_lazy_export() -> None:
    assert hf_compress.plan is plan


def test_plan_meets_the_size_budget_and_leaves_the_model_dense(planned: tuple[Arch, Any, PlanResult]) -> None:
    arch, model, res = planned
    dense_bytes = model_bytes(tiny_model(arch))
    assert model_bytes(model) == dense_bytes  # candidates ran on copies
    assert res.dense["bytes"] == dense_bytes
    assert res.result["bytes"] <= 0.6 * dense_bytes
    assert model_bytes(res.model) == res.result["bytes"]
    # the plan applied from scratch gives the same size
    fresh = compress(tiny_model(arch), res.config, calibration=calibration(arch)[:-1], progress=False)
    assert model_bytes(fresh) == res.result["bytes"]
    # every measured row is in the table, with the byte accounting the search used
    groups = find_groups(model)
    assert {r["group"] for r in res.table} == set(groups)
    assert all(r["bytes_saved"] > 0 for r in res.table if r["method"] == "jlcm")
    text = res.format_table()
    assert "<==" in text and "dense:" in text and all(g[:44] in text for g in groups)


def test_plan_config_round_trips_through_json(planned: tuple[Arch, Any, PlanResult], tmp_path: Any) -> None:
    _, _, res = planned
    again = CompressionConfig.from_json(res.config.to_json(tmp_path / "plan.json"))
    assert again.to_dict() == res.config.to_dict()
    assert len(again.modules) >= 2
    import json

    doc = json.loads(res.to_json())
    assert doc["config"] == res.config.to_dict() and doc["result"]["bytes"] == res.result["bytes"]


def test_compressed_model_saves_and_reloads_with_identical_logits(planned: tuple[Arch, Any, PlanResult],
                                                                  tmp_path: Any) -> None:
    arch, _, res = planned
    inputs = arch.inputs()
    before = model_output(res.model.eval(), inputs)
    res.model.save_pretrained(tmp_path)
    again = arch.auto_class.from_pretrained(tmp_path).eval()
    assert torch.equal(model_output(again, inputs), before)
    assert set(again.config.compression_config["modules"]) == set(res.config.modules)


@pytest.mark.parametrize("arch", [LLAMA, WHISPER], ids=["llama", "whisper"])
def test_uses_several_methods_when_no_single_method_meets_the_budget(arch: Arch) -> None:
    model = tiny_model(arch)
    cal = calibration(arch)
    cands = {"embedding": [TTEmbeddingConfig(format="adaptive", compression=3.0)], "attention": [],
             "linear": [CodebookConfig(bits=3, method="kmeans", kmeans_iters=4)]}
    first = plan(model, 0.9, cal, candidates=cands, progress=False)
    per_method: dict[str, int] = {}
    for row in first.table:
        per_method[row["method"]] = per_method.get(row["method"], 0) + max(row["bytes_saved"], 0)
    assert set(per_method) == {"tt_embedding", "jlcm"}
    dense = first.dense["bytes"]
    target = dense - max(per_method.values()) - 1  # beyond any single method
    assert target > dense - sum(per_method.values())  # reachable by combining them
    res = plan(model, {"bytes": target}, cal, candidates=cands, reuse=first, keep_model=True, progress=False)
    assert res.methods == ["jlcm", "tt_embedding"]
    assert res.result["bytes"] <= target == res.budget["limit"]
    assert model_bytes(res.model) == res.result["bytes"]


def test_methods_filter_and_unreachable_budget() -> None:
    model = tiny_model(LLAMA)
    cal = calibration(LLAMA)
    res = plan(model, 0.8, cal, methods=["low_rank"], progress=False)
    assert res.methods == ["low_rank"] and res.result["bytes"] <= 0.8 * res.dense["bytes"]
    with pytest.raises(ValueError, match="out of reach"):
        plan(model, 0.05, cal, methods=["low_rank"], reuse=res, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        plan(model, 0.8, cal, methods=["nope"], progress=False)


def test_quality_budget_is_respected_when_measured(planned: tuple[Arch, Any, PlanResult]) -> None:
    arch, model, first = planned
    res = plan(model, {"quality": 1.002}, calibration(arch), candidates=CANDIDATES, reuse=first, progress=False)
    assert res.result["quality"] <= 1.002 * res.dense["quality"] or res.result["steps"] == 0
    assert res.result["bytes"] < res.dense["bytes"]  # tiny random models lose little: something was compressed


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (0.0, "size budget 0.0"),
        (1.0, "size budget 1.0"),
        (-0.2, "size budget -0.2"),
        ({"size": 1.5}, "fraction of the dense bytes"),
        ({"bytes": 0}, "bytes budget 0"),
        ({"bytes": 10**12}, "bytes budget"),
        ({"quality": 0.9}, "must be >= 1"),
        ({"quality_delta": -1.0}, "must be > 0"),
        ({"params": 0.5}, "budget must be"),
        ({"size": 0.5, "bytes": 10}, "budget must be"),
        ("0.5", "budget must be"),
        (True, "budget must be"),
        (None, "budget must be"),
    ],
)
def test_bad_budgets_are_rejected(budget: Any, message: str) -> None:
    with pytest.raises(ValueError, match=r"hf_compress\.plan") as err:
        plan(tiny_model(LLAMA), budget, calibration(LLAMA), progress=False)
    assert message in str(err.value)


def test_needs_data_to_measure_quality() -> None:
    with pytest.raises(ValueError, match="give calibration batches"):
        plan(tiny_model(LLAMA), 0.5, None, progress=False)


def test_quality_ratio_needs_a_nonzero_baseline() -> None:
    model = tiny_model(LLAMA)
    from hf_compress.sweep import output_error_fn

    cal = calibration(LLAMA)
    with pytest.raises(ValueError, match="quality_delta"):
        plan(model, {"quality": 1.1}, cal, eval_fn=output_error_fn(model, cal[-1:]), progress=False)


def test_groups_and_default_candidates() -> None:
    from hf_compress.planning import default_candidates

    kinds = {g.key: g.kind for g in find_groups(tiny_model(WHISPER)).values()}
    assert kinds == {"model.decoder.embed_tokens": "embedding", "model.encoder.layers.*.self_attn": "attention",
                     "model.decoder.layers.*.self_attn": "attention", "model.decoder.layers.*.encoder_attn":
                     "attention", "model.encoder.layers.*.fc1": "linear", "model.encoder.layers.*.fc2": "linear",
                     "model.decoder.layers.*.fc1": "linear", "model.decoder.layers.*.fc2": "linear"}
    llama = find_groups(tiny_model(LLAMA))
    assert [g.kind for g in llama.values()].count("attention") == 1 and "lm_head" not in llama
    assert len(llama["model.layers.*.self_attn"].linears) == 8  # q, k, v, o of both layers
    assert {c.registry_name for c in default_candidates("attention")} == {"product_twin", "low_rank", "jlcm"}
    assert {c.registry_name for c in default_candidates("embedding")} == {"tt_embedding", "jlcm"}
    assert all(c.method == "svd" for c in default_candidates("linear", calibrated=False)
               if c.registry_name == "low_rank")
    with pytest.raises(ValueError, match="unknown group kind"):
        default_candidates("conv")


def test_size_budget_walks_back_an_overshooting_last_move() -> None:
    """Greedy by cost per byte takes the cheap-per-byte big move last and overshoots; the walk back then returns
    the costlier small move to dense, since the plan still fits without it."""
    from hf_compress.planning import _greedy

    options = {"a": [{"bytes_saved": 10, "cost": 0.04, "candidate": "a-small"}],
               "b": [{"bytes_saved": 60, "cost": 0.3, "candidate": "b-big"}]}
    path = _greedy(options, total=100, q0=10.0, sign=1.0, kind="bytes", limit=45)
    assert [p["added"] for p in path] == ["a -> a-small", "b -> b-big", "a -> dense (walk back)"]
    assert path[-1]["choice"] == {"b": 0} and path[-1]["bytes"] == 40 and [p["step"] for p in path] == [1, 2, 3]
    assert path[-1]["predicted_quality"] < path[-2]["predicted_quality"]
    tight = _greedy(options, total=100, q0=10.0, sign=1.0, kind="bytes", limit=30)
    assert tight[-1]["choice"] == {"a": 0, "b": 0}  # nothing can be given back


@pytest.mark.parametrize(("q", "b", "met", "pareto"), [(31.0, 50, True, True), (20.0, 50, False, True),
                                                       (35.0, 110, False, False)])
def test_mixed_suite_goal_check(q: float, b: int, met: bool, pareto: bool) -> None:
    """The benchmark's goal: smaller than every single setting at the same quality (``met``); Pareto (``pareto``)."""
    from benchmarks.suites.mixed import _goal

    def rec(method: str, ppl: float, size: int) -> dict:
        return {"method": method, "setting": {"label": method}, "quality": {"ppl": ppl}, "size": {"bytes_fp16": size}}

    goal = _goal(rec("mixed", q, b), [rec("a", 30.0, 100), rec("b", 40.0, 60)], "ppl")
    assert (goal["met"], goal["pareto"]) == (met, pareto)


def test_a_candidate_out_of_reach_on_a_module_is_skipped() -> None:
    model = tiny_model(WHISPER)  # a 96-token table cannot be stored 4x smaller with its per-token index buffers
    cands = {"embedding": [TTEmbeddingConfig(format="adaptive", compression=4.0)], "attention": [],
             "linear": [CodebookConfig(bits=3, method="kmeans", kmeans_iters=4)]}
    res = plan(model, 0.9, calibration(WHISPER), candidates=cands, progress=False)
    assert {row["method"] for row in res.table} == {"jlcm"}


def test_already_compressed_layers_are_neither_groups_nor_recompressed() -> None:
    model = tiny_model(LLAMA)
    compress(model, CompressionConfig(modules={r"self_attn\.q_proj": LowRankConfig(rank_ratio=0.5)}), progress=False)
    groups = find_groups(model)
    # the attention holds a low-rank q_proj: no product-twin group; the factors of the low-rank layers are no groups
    assert not [g for g in groups.values() if g.kind == "attention"]
    assert not [n for g in groups.values() for n in g.linears if ".q_proj." in n or n.endswith("q_proj")]
    assert any(n.endswith("self_attn.k_proj") for g in groups.values() for n in g.linears)
    with pytest.raises(ValueError, match=r"self_attn: ProductTwinConfig needs the dense module, but q_proj "
                                         r"\(LowRankLinear\) inside it is already compressed"):
        compress(model, CompressionConfig(modules={r"self_attn$": ProductTwinConfig(rank_ratio=0.5)}), progress=False)


def test_a_pattern_matching_only_compressed_modules_says_so() -> None:
    model = tiny_model(LLAMA)
    compress(model, CompressionConfig(modules={"q_proj": LowRankConfig(rank=4)}), progress=False)
    with pytest.warns(UserWarning, match=r"'q_proj' matched only already-compressed modules \(model\.layers\.0"):
        compress(model, CompressionConfig(modules={"q_proj": LowRankConfig(rank=8)}), progress=False)
