"""Low-rank method family: svd / whitened / asvd / tucker on tiny random models (table-driven)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ARCHS, tiny_model

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig, LowRankLinear
from hf_compress.calibration import input_statistics_streamed
from hf_compress.layers.lowrank import spectrum
from hf_compress.layers.tucker import TuckerLinear
from hf_compress.methods import lowrank as lr

METHODS = ["svd", "whitened", "asvd", "tucker"]
LLAMA_ARCH = ARCHS[0]


def _calibration(arch, n: int = 3) -> list:
    batches = [arch.inputs(batch=1, seq=12, seed=10 + i) for i in range(n)]
    return [b if arch.name == "whisper" else b["input_ids"] for b in batches]


def _out(model, x) -> torch.Tensor:
    out = model(**x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[:, None]
    return torch.randn(n, d, generator=g) @ mix + 0.01 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("heads_on", ["out", "in"])
@pytest.mark.parametrize("bias", [True, False])
def test_tucker_full_ranks_exact(heads_on: str, bias: bool) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 48, bias=bias) if heads_on == "out" else torch.nn.Linear(48, 40, bias=bias)
    layer = TuckerLinear.from_dense(lin, head_dim=8, heads_on=heads_on, ranks=(6, 8, 40))
    x = torch.randn(3, 5, lin.in_features)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight, lin.weight.detach(), atol=1e-5, rtol=1e-5)
    partial = TuckerLinear.from_dense(lin, head_dim=8, heads_on=heads_on, ranks=(3, 4, 10))
    assert {"factor_heads", "factor_head_dim", "core", "factor_hidden"} <= {n for n, _ in partial.named_children()}
    assert all(isinstance(m, torch.nn.Linear) for m in partial.children())


@pytest.mark.parametrize(("ranks", "match"), [((7, 8, 10), r"rank 7 for mode 'heads' must be in 1\.\.6"),
                                              ((6, 9, 10), r"mode 'head_dim' must be in 1\.\.8"),
                                              ((1, 1, 5), "inconsistent")])
def test_tucker_ranks_beyond_mode_rejected(ranks: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TuckerLinear.from_dense(torch.nn.Linear(40, 48), head_dim=8, ranks=ranks)


def test_whitened_full_rank_exact_and_beats_svd_on_correlated_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 48, generator=g)
    x = _correlated(2000, 48)
    cov = x.T.double() @ x.double() / x.shape[0]
    full = spectrum(w, cov=cov)
    up, down = full.factors(32)
    torch.testing.assert_close((up @ down).float(), w, atol=1e-4, rtol=1e-4)
    errs = {}
    for name, spec in {"svd": spectrum(w), "whitened": full, "asvd": spectrum(w, abs_mean=x.abs().mean(0))}.items():
        up, down = spec.factors(8)
        errs[name] = torch.linalg.norm(x @ (w - (up @ down).float()).T) / torch.linalg.norm(x @ w.T)
    assert errs["whitened"] < 0.8 * errs["svd"] and errs["whitened"] <= errs["asvd"] + 1e-6


def test_whitening_damps_singular_covariance() -> None:
    x = torch.randn(100, 6).double() @ torch.randn(6, 16).double()  # rank 6 covariance of 16 channels
    spec = spectrum(torch.randn(8, 16), cov=x.T @ x / 100)
    up, down = spec.factors(8)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
@pytest.mark.parametrize("method", METHODS)
def test_methods_compress_save_reload(arch, method: str, tmp_path) -> None:
    model = tiny_model(arch)
    cfg = LowRankConfig(method=method, rank_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hf_compress.compress(model, CompressionConfig(modules={arch.attn_pattern: cfg}),
                             calibration=_calibration(arch), progress=False)
    layer_type = TuckerLinear if method == "tucker" else LowRankLinear
    assert any(isinstance(m, layer_type) for m in model.modules())
    x = arch.inputs()
    expected = _out(model, x)
    model.save_pretrained(tmp_path)
    again = arch.auto_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_out(again, x), expected)


def test_full_rank_whitened_model_is_exact() -> None:
    """Real calibration covariances of a model; full-rank whitened factors reproduce its outputs."""
    model = tiny_model(LLAMA_ARCH)
    x = LLAMA_ARCH.inputs()
    ref = _out(model, x)
    cfg = LowRankConfig(method="whitened", rank=32)
    names = [n for n, _ in model.named_modules() if n.endswith(("k_proj", "down_proj"))]
    for name, stat in list(lr.calibration_statistics(model, dict.fromkeys(names, cfg), _calibration(LLAMA_ARCH))):
        module = model.get_submodule(name)
        spec = lr.layer_spectrum(module, cfg, stat, name)
        model.set_submodule(name, LowRankLinear.from_spectrum(spec, min(module.weight.shape), None, torch.float32))
    torch.testing.assert_close(_out(model, x), ref, atol=1e-4, rtol=1e-4)
    assert lr.CALIBRATION_REPORT["passes"] >= 1 and lr.CALIBRATION_REPORT["peak_stat_bytes"] > 0


def test_whitened_beats_svd_on_model_outputs() -> None:
    x, calib = LLAMA_ARCH.inputs(seq=12), _calibration(LLAMA_ARCH, 6)
    errs = {}
    for method in ("svd", "whitened"):
        model = tiny_model(LLAMA_ARCH)
        ref = _out(model, x)
        plan = CompressionConfig(modules={LLAMA_ARCH.mlp_pattern: LowRankConfig(method=method, rank_ratio=0.3)})
        hf_compress.compress(model, plan, calibration=calib, progress=False)
        errs[method] = float((_out(model, x) - ref).norm() / ref.norm())
    assert errs["whitened"] < errs["svd"]


def test_energy_selects_rank_and_streaming_shares_inputs() -> None:
    model = tiny_model(LLAMA_ARCH)
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    chunks = list(input_statistics_streamed(model, names, _calibration(LLAMA_ARCH), max_bytes=1))
    assert len(chunks) == 3  # one module per chunk with a 1-byte budget
    stats, info = next(iter(input_statistics_streamed(model, names, _calibration(LLAMA_ARCH))))
    assert stats[names[0]] is stats[names[1]] is stats[names[2]] and info["stat_bytes"] == 64 * 64 * 8
    hf_compress.compress(model, CompressionConfig(modules={"o_proj": LowRankConfig(energy=0.5)}), progress=False)
    layer = model.model.layers[0].self_attn.o_proj
    s = torch.linalg.svdvals(tiny_model(LLAMA_ARCH).model.layers[0].self_attn.o_proj.weight.detach().double())
    share = (s**2).cumsum(0) / (s**2).sum()
    assert layer.rank == int((share < 0.5).sum()) + 1


def test_allocate_ranks_follows_relative_energy_per_parameter() -> None:
    flat, steep = torch.ones(32), torch.logspace(0, -6, 32)  # the steep layer needs few ranks for its energy
    ranks = lr.allocate_ranks({"flat": (flat, 64, 64), "steep": (steep, 64, 64)}, keep=20 * 128)
    assert sum(ranks.values()) * 128 <= 20 * 128 and ranks["flat"] > ranks["steep"] >= 1
    # brute force over all splits: the greedy split has the least summed relative truncation error
    def err(name: str, r: int) -> float:
        s = {"flat": flat, "steep": steep}[name].double() ** 2
        return float(s[r:].sum() / s.sum())
    best = min(err("flat", r) + err("steep", 20 - r) for r in range(1, 20))
    assert err("flat", ranks["flat"]) + err("steep", ranks["steep"]) <= best + 1e-12
    capped = lr.allocate_ranks({"a": (torch.ones(64), 64, 64)}, keep=10**9)
    assert capped["a"] * 128 < 64 * 64  # never a factorization as large as the dense weight


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_global_allocation_meets_the_budget_and_reloads(method: str, tmp_path) -> None:
    model = tiny_model(LLAMA_ARCH)
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    dense = sum(model.get_submodule(n).weight.numel() for n in names)
    plan = CompressionConfig(modules={r"(q_proj|down_proj)$": LowRankConfig(method=method, rank_ratio=0.4,
                                                                             allocation="global")})
    hf_compress.compress(model, plan, calibration=_calibration(LLAMA_ARCH), progress=False)
    layers = [model.get_submodule(n) for n in names]
    assert all(isinstance(m, LowRankLinear) for m in layers)
    kept = sum(m.rank * (m.in_features + m.out_features) for m in layers)
    assert 0.3 * dense < kept <= 0.4 * dense and len({m.rank for m in layers}) > 1
    x = LLAMA_ARCH.inputs()
    expected = _out(model, x)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_out(LLAMA_ARCH.auto_class.from_pretrained(tmp_path).eval(), x), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"method": "tucker", "rank": 4}, "takes tucker_ranks"),
     ({"rank": 4, "allocation": "global"}, "allocation='global'.*needs rank_ratio"),
     ({"rank_ratio": 0.5, "allocation": "layerwise"}, "allocation must be one of"),
     ({"tucker_ranks": [1, 2, 3]}, "tucker_ranks needs method='tucker'"),
     ({"method": "tucker", "tucker_ranks": [1, 2]}, "3 positive ints"),
     ({"energy": 1.5}, r"energy must be in \(0, 1\]"),
     ({"rank": 2, "energy": 0.5}, "exactly one"),
     ({"method": "whitened", "rank": 2, "damping": -1.0}, "damping and .alpha must be >= 0"),
     ({"rank": 2, "sequential": True}, r"sequential=True\) applies to the calibrated methods.*method='svd'"),
     ({"method": "whitened", "rank_ratio": 0.5, "allocation": "global", "sequential": True},
      "allocation='global'")],
)
def test_bad_configs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LowRankConfig(**kwargs)


def test_bad_inputs_name_the_module_and_fix() -> None:
    msg = r"needs calibration batches for model\.layers\.0\.self_attn\.q_proj.*calibration=batches"
    with pytest.raises(hf_compress.CalibrationRequiredError, match=msg):
        hf_compress.compress(tiny_model(LLAMA_ARCH), CompressionConfig(
            modules={"q_proj": LowRankConfig(method="whitened", rank=4)}), progress=False)
    with pytest.raises(ValueError, match=r"mlp\.up_proj: method='tucker' decomposes attention projections only"):
        hf_compress.compress(tiny_model(LLAMA_ARCH), CompressionConfig(
            modules={"up_proj": LowRankConfig(method="tucker", rank_ratio=0.5)}), progress=False)


def test_tucker_factors_are_peft_targetable() -> None:
    peft = pytest.importorskip("peft")
    model = tiny_model(LLAMA_ARCH)
    hf_compress.compress(model, CompressionConfig(modules={"q_proj": LowRankConfig(
        method="tucker", tucker_ranks=[2, 8, 16])}), progress=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["core", "factor_hidden"]))
    assert pm.get_nb_trainable_parameters()[0] > 0
    pm(**LLAMA_ARCH.inputs())
