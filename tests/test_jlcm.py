"""JLCM codebooks: life cycle on every architecture, bit packing, bytes on disk, the optimizer, config errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, Arch, calibration_batches, tiny_model
from conftest import model_output as _out
from safetensors.torch import load_file, save_file

import hf_compress
from hf_compress import CompressionConfig
from hf_compress.layers.codebook import CodebookLinear, perm_bits
from hf_compress.methods.jlcm import (
    CodebookConfig,
    codebook_from_dense,
    freeze_codebooks,
    layer_bits,
    mark_codebooks_trainable,
)
from hf_compress.packing import pack_bits, packed_nbytes, unpack_bits


# ---- life cycle ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "bpw"), [("jlcm", 3), ("kmeans", 2.5), ("rtn", 4), ("gptq", 3)])
def test_compress_forward_save_reload_bit_identical(arch: Arch, method: str, bpw: float, tmp_path: Path) -> None:
    model = tiny_model(arch)
    inputs = arch.inputs()
    plan = CompressionConfig(modules={f"{arch.attn_pattern}|{arch.mlp_pattern}":
                                      CodebookConfig(bits_per_weight=bpw, method=method, steps=3, kmeans_iters=4)})
    dense_logits = _out(model, inputs)
    hf_compress.compress(model, plan, calibration=calibration_batches(arch), progress=False)
    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    assert layers and all(m.indices.dtype == torch.uint8 and m.codebooks.dtype == torch.float16 for m in layers)
    logits = _out(model, inputs)
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)
    model.save_pretrained(tmp_path)
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in tmp_path.iterdir())
    specs = json.loads((tmp_path / "config.json").read_text())["compression_config"]["layers"]
    assert {s["type"] for s in specs.values()} == {"codebook_linear"}
    again = arch.auto_class.from_pretrained(tmp_path)
    assert torch.equal(_out(again, inputs), logits)


@pytest.mark.parametrize("cast", ["to_bf16", "half", "float"])
def test_dtype_casts_keep_fp16_storage(cast: str, tmp_path: Path) -> None:
    """``model.to(bf16)`` / ``.half()`` / ``.float()`` cast the dense layers; the fp16 codebooks, scales and offsets
    are storage and stay fp16 (a bf16 rounding of them would be saved); the forward runs in the new dtype."""
    arch = ARCHS[0]
    model = tiny_model(arch)
    plan = CompressionConfig(modules={arch.mlp_pattern: CodebookConfig(bits=3, method="kmeans", block_size=16)})
    hf_compress.compress(model, plan, progress=False)
    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    before = {id(m): [p.detach().clone() for p in m.storage()] for m in layers}
    reference = _out(model, arch.inputs())
    dtype = {"to_bf16": torch.bfloat16, "half": torch.float16, "float": torch.float32}[cast]
    model = model.to(dtype) if cast == "to_bf16" else getattr(model, cast)()
    assert all(torch.equal(p, q) and p.dtype == torch.float16
               for m in layers for p, q in zip(m.storage(), before[id(m)], strict=True))
    assert model.dtype == dtype and all(m.bias is None or m.bias.dtype == dtype for m in layers)
    logits = _out(model, arch.inputs())
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), reference, rtol=0.1, atol=0.1)
    model.save_pretrained(tmp_path)
    saved = load_file(next(tmp_path.glob("*.safetensors")))
    assert {saved[k].dtype for k in saved if k.endswith((".codebooks", ".scales", ".offsets"))} == {torch.float16}


def test_cast_after_backward_keeps_master_codebooks_and_their_grads() -> None:
    """fp32 master codebooks with gradients, then ``model.to(bf16)``: values and grads keep their dtype, so the
    optimizer step still runs."""
    arch = ARCHS[0]
    model = tiny_model(arch)
    plan = CompressionConfig(modules={arch.mlp_pattern: CodebookConfig(bits=3, method="kmeans")})
    hf_compress.compress(model, plan, progress=False)
    mark_codebooks_trainable(model)
    model(**arch.inputs(), labels=arch.inputs()["input_ids"]).loss.backward()
    model.to(torch.bfloat16)
    books = [m.codebooks for m in model.modules() if isinstance(m, CodebookLinear)]
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in books)
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]).step()


def test_lookup_mode_matches_cached_and_cache_follows_codebook_edits() -> None:
    g = torch.Generator().manual_seed(0)
    layer, _ = codebook_from_dense(torch.randn(24, 32, generator=g), torch.randn(24, generator=g),
                                   CodebookConfig(bits=3, method="kmeans", group_size=4))
    x = torch.randn(5, 32, generator=g)
    cached = layer(x)
    layer.mode = "lookup"
    assert torch.equal(layer(x), cached)
    layer.mode = "cached"
    with torch.no_grad():
        layer.codebooks.mul_(2)
    torch.testing.assert_close(layer(x) - layer.bias, 2 * (cached - layer.bias), rtol=1e-3, atol=1e-3)


# ---- packing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [*range(1, 9), 12, 16, 17, 18, 24, 31])
@pytest.mark.parametrize("seed", range(6))
def test_pack_unpack_round_trip(bits: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed * 31 + bits)
    n = int(torch.randint(0, 200, (1,), generator=g))
    values = torch.randint(0, 1 << bits, (n,), generator=g)
    if n:
        values[0], values[-1] = 0, (1 << bits) - 1  # both extremes present
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), values)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"values must lie in \[0, 8\) for 3 bits"):
        pack_bits(torch.tensor([8]), 3)
    for bits in (0, 32):
        with pytest.raises(ValueError, match=r"bit width must be an int in 1\.\.31"):
            pack_bits(torch.tensor([1]), bits)
    with pytest.raises(ValueError, match="need 2 bytes, got 1"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)


# ---- bytes on disk ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "d", "shared"),
                         [(1, 1, False), (3, 1, False), (5, 2, True), (6, 4, False), (8, 1, False)])
def test_disk_bytes_match_arithmetic(bits: int, d: int, shared: bool, tmp_path: Path) -> None:
    out, inn, groups = 37, 64, 3
    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(bits))
    cfg = CodebookConfig(bits=bits, vector_dim=d, n_groups=groups, shared_codebook=shared, method="rtn")
    layer, _ = codebook_from_dense(w, torch.zeros(out), cfg)
    books = 1 if shared else groups
    expected = {"indices": -(-out * inn // d * bits // 8), "perm": -(-out * perm_bits(out) // 8),
                "codebooks": books * (1 << bits) * d * 2, "scales": groups * 2, "bias": out * 4}
    assert layer.storage_bytes() == expected
    assert {k: -(-v // 8) for k, v in layer_bits(layer).items()} == {k: expected[k] for k in layer_bits(layer)}
    path = tmp_path / "layer.safetensors"
    save_file(dict(layer.state_dict()), str(path))
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size == 8 + header + sum(expected.values())


def test_checkpoint_bytes_match_arithmetic(tmp_path: Path) -> None:
    arch = ARCHS[0]
    model = tiny_model(arch)
    hf_compress.compress(model, CompressionConfig(modules={arch.mlp_pattern: CodebookConfig(bits=3, method="rtn")}),
                         progress=False)
    model.save_pretrained(tmp_path)
    blob = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])
    stored = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    sd = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, CodebookLinear):
            bits = sum(layer_bits(m).values())  # codebooks/scales fp16, indices and permutation packed
            on_disk = sum(v for k, v in stored.items() if k.startswith(name + "."))
            assert on_disk == sum(-(-b // 8) for b in layer_bits(m).values()) and on_disk * 8 - bits < 32
    assert sum(stored.values()) == sum(t.numel() * t.element_size() for k, t in sd.items() if k in stored)
    assert len(blob) == 8 + struct.unpack("<Q", blob[:8])[0] + sum(stored.values())


# ---- the optimizer ---------------------------------------------------------------------------------------------
def _correlated_layer(seed: int, out: int = 64, inn: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with heavy-tailed rows and ``Σ = XᵀX/n`` of correlated, unevenly scaled inputs (like LLM acts)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.Laplace(0, 1).sample((out, inn)) * torch.rand(out, 1, generator=g).add(0.5)
    z = torch.randn(2048, 16, generator=g)
    x = z @ torch.randn(16, inn, generator=g) + 0.3 * torch.randn(2048, inn, generator=g)
    x = x * torch.rand(inn, generator=g).pow(3).mul(4).add(0.1)  # a few large-magnitude channels
    return w, x.T @ x / x.shape[0]


def _loss(layer: CodebookLinear, w: torch.Tensor, sigma: torch.Tensor) -> float:
    e = layer.weight.detach().float() - w
    return float((e * (e @ sigma)).sum())


@pytest.mark.parametrize("seed", range(3))
def test_jlcm_beats_kmeans_beats_rtn(seed: int) -> None:
    w, sigma = _correlated_layer(seed)
    losses = {}
    for method in ("rtn", "kmeans", "gptq", "jlcm"):
        cfg = CodebookConfig(bits=3, group_size=8, method=method, steps=10, error_feedback=1)
        layer, _ = codebook_from_dense(w, None, cfg, sigma)
        losses[method] = _loss(layer, w, sigma)
    assert losses["jlcm"] < losses["kmeans"] <= losses["rtn"], losses
    assert losses["jlcm"] < losses["gptq"] < losses["rtn"], losses


@pytest.mark.parametrize("block", [None, 32])
def test_error_feedback_rounds_lower_the_output_loss(block: int | None) -> None:
    w, sigma = _correlated_layer(1)
    losses = {}
    for rounds in (0, 1):
        cfg = CodebookConfig(bits=3, group_size=16, block_size=block, steps=4, error_feedback=rounds)
        layer, stats = codebook_from_dense(w, None, cfg, sigma)
        losses[rounds] = _loss(layer, w, sigma)
        assert stats["rounds"] == rounds
    assert losses[1] < 0.9 * losses[0], losses


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest() -> None:
    """With a diagonal Σ no error is fed forward: the codes are exactly the nearest codewords."""
    from hf_compress.methods.codebook_fit import nearest
    from hf_compress.methods.gptq import gptq_codes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 40, generator=g)
    centers = torch.randn(12, 8, 1, generator=g).sort(1).values
    s_map, o_map = torch.ones(12, 40), torch.zeros(12, 40)
    codes, _, _ = gptq_codes(w, torch.diag(torch.rand(40, generator=g) + 0.5), centers, s_map, o_map)
    assert torch.equal(codes, nearest(w[:, :, None], centers))


def test_proximal_mapping_update_beats_straight_through() -> None:
    w, sigma = _correlated_layer(0)
    stats = {}
    for update in ("proximal", "ste"):
        cfg = CodebookConfig(bits=3, group_size=8, steps=10, mapping_update=update, error_feedback=0)
        _, stats[update] = codebook_from_dense(w, None, cfg, sigma)
    # same initialization; the proximal mapping step finds accepted moves, the STE one (far jumps) hardly any
    assert stats["proximal"]["loss_init"] == stats["ste"]["loss_init"]
    assert stats["proximal"]["loss_final"] < stats["ste"]["loss_final"] <= stats["ste"]["loss_init"]
    assert stats["proximal"]["accepted"] > stats["ste"]["accepted"]


def test_shared_codebook_with_scales_and_groups_of_similar_rows() -> None:
    w, sigma = _correlated_layer(1)
    layer, _ = codebook_from_dense(w, None, CodebookConfig(bits=4, n_groups=8, shared_codebook=True, steps=4), sigma)
    assert layer.codebooks.shape == (1, 16, 1) and layer.scales.shape == (8,)
    scale_of_row = layer.scales.float()[layer.row_groups()][torch.argsort(layer.permutation())]
    rms = w.pow(2).mean(1).sqrt()
    assert torch.corrcoef(torch.stack([scale_of_row, rms]))[0, 1] > 0.8  # rows grouped by their distribution


# ---- fine-tuning -----------------------------------------------------------------------------------------------
def test_finetune_codebooks_with_trainer_indices_fixed(tmp_path: Path) -> None:
    import transformers

    arch = ARCHS[0]
    model = tiny_model(arch)
    hf_compress.compress(model, CompressionConfig(modules={arch.mlp_pattern: CodebookConfig(bits=2, method="rtn")}),
                         progress=False)
    trainable = mark_codebooks_trainable(model)
    assert trainable and all("codebooks" in n or "scales" in n or "norm" in n or "bias" in n for n in trainable)
    indices = {n: b.clone() for n, b in model.named_buffers() if n.endswith("indices")}
    ids = torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]

    def eval_loss() -> float:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    before = eval_loss()
    args = transformers.TrainingArguments(str(tmp_path), max_steps=15, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=100,
                                          use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    trained = eval_loss()
    assert trained < before
    assert all(torch.equal(b, indices[n]) for n, b in model.named_buffers() if n in indices)
    assert freeze_codebooks(model) > 0 and all(p.dtype == torch.float16 for n, p in model.named_parameters()
                                                if n.endswith(("codebooks", "scales")))
    assert eval_loss() == pytest.approx(trained, rel=1e-2)  # fp16 storage rounding only


# ---- config errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 0}, r"CodebookConfig.bits must be an int in 1..16, got 0"),
    ({"bits": 17}, r"CodebookConfig.bits must be an int in 1..16, got 17"),
    ({"bits_per_weight": 0.3}, r"bits_per_weight 0.3 must be b/d"),
    ({"bits": 3, "bits_per_weight": 2.0}, r"contradict bits_per_weight"),
    ({"bits": 3, "codebook_size": 9}, r"codebook_size must be in \[2, 2\*\*bits = 8\]"),
    ({"method": "quip"}, r"method must be one of \('jlcm', 'kmeans', 'rtn', 'gptq'\)"),
    ({"error_feedback": -1}, r"error_feedback must be >= 0"),
    ({"mapping_update": "sgd"}, r"mapping_update must be one of"),
    ({"n_groups": 0}, r"n_groups must be a positive int"),
])
def test_bad_configs_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CodebookConfig(**kwargs)


def test_more_codewords_than_weights_rejected() -> None:
    with pytest.raises(ValueError, match=r"codebook of 256 codewords exceeds the 16 weight vectors of a row group"):
        codebook_from_dense(torch.randn(4, 16), None, CodebookConfig(bits=8, n_groups=4, method="rtn"))
    with pytest.raises(ValueError, match=r"vector_dim 3 must be >= 1 and divide in_features 16"):
        codebook_from_dense(torch.randn(4, 16), None, CodebookConfig(bits=3, vector_dim=3, method="rtn"))


def test_jlcm_without_calibration_is_a_clear_error() -> None:
    arch = ARCHS[0]
    with pytest.raises(hf_compress.CalibrationRequiredError, match=r"needs calibration batches"):
        hf_compress.compress(tiny_model(arch), CompressionConfig(modules={arch.mlp_pattern: CodebookConfig()}),
                             progress=False)


def test_bits_per_weight_derives_bits_and_vector_dim() -> None:
    assert (CodebookConfig(bits_per_weight=2.5).bits, CodebookConfig(bits_per_weight=2.5).vector_dim) == (5, 2)
    assert (CodebookConfig(bits_per_weight=3).bits, CodebookConfig(bits_per_weight=3).vector_dim) == (3, 1)
    cfg = CodebookConfig(bits_per_weight=0.75)
    assert (cfg.bits, cfg.vector_dim) == (3, 4)
    assert CodebookConfig.from_dict(cfg.to_dict()) == cfg


# ---- blockwise scales and offsets (block_size) -----------------------------------------------------------------
def test_block_rtn_is_asymmetric_round_to_nearest_per_block() -> None:
    """With ``block_size=B`` and a uniform codebook, ``rtn`` is exactly asymmetric RTN with groups of B columns."""
    out, inn, block, bits = 12, 64, 16, 3
    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(3))
    layer, _ = codebook_from_dense(w, None, CodebookConfig(bits=bits, method="rtn", block_size=block, n_groups=1))
    wb = w.view(out, -1, block)
    lo = wb.amin(-1, keepdim=True).half().float()
    scale = (wb.amax(-1, keepdim=True) - lo).half().float()
    q = torch.round((wb - lo) / scale * ((1 << bits) - 1)).clamp(0, (1 << bits) - 1)
    assert layer.scales.shape == layer.offsets.shape == (out, inn // block)
    levels = layer.codebooks[0, :, 0].float()  # the uniform grid 0, 1/7, ..., 1 rounded to fp16
    torch.testing.assert_close(levels, torch.linspace(0, 1, 1 << bits), rtol=0, atol=1e-3)
    codes = layer.codes().long().view(out, -1, block)  # one group: sorted rows are the original rows
    same = codes == q.long()
    assert same.float().mean() > 0.99  # (only exact ties can flip, the levels being fp16)
    torch.testing.assert_close(layer._dequantize(torch.float32).view(out, -1, block)[same],
                               (levels[codes] * scale + lo)[same], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("bits", "d", "block"), [(3, 1, 16), (5, 2, 32), (4, 1, 64)])
def test_block_disk_bytes_and_reload(bits: int, d: int, block: int, tmp_path: Path) -> None:
    out, inn = 20, 64
    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(bits))
    cfg = CodebookConfig(bits=bits, vector_dim=d, n_groups=2, block_size=block, method="kmeans")
    layer, _ = codebook_from_dense(w, None, cfg)
    n_blocks = out * inn // block
    expected = {"indices": -(-out * inn // d * bits // 8), "perm": -(-out * perm_bits(out) // 8),
                "codebooks": 2 * (1 << bits) * d * 2, "scales": n_blocks * 2, "offsets": n_blocks * 2}
    assert layer.storage_bytes() == expected
    assert {k: -(-v // 8) for k, v in layer_bits(layer).items()} == expected
    path = tmp_path / "layer.safetensors"
    save_file(dict(layer.state_dict()), str(path))
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size == 8 + header + sum(expected.values())
    again = CodebookLinear.from_spec(layer.spec())
    again.load_state_dict(load_file(str(path)))
    x = torch.randn(3, inn)
    assert torch.equal(again(x), layer(x))


@pytest.mark.parametrize("scale", [1.0, 0.02], ids=["unit", "llm-scale"])
@pytest.mark.parametrize("block", [None, 32])
def test_kmeans_never_worse_than_rtn_on_weight_error(block: int | None, scale: float) -> None:
    """k-means starts at the RTN grid and Lloyd steps are monotone: its weight error is at most RTN's, at any weight
    scale (block k-means weights each vector by its block scale²; at LLM scale their sums per cluster are < 1, and
    dividing by max(sum, 1) shrank the centroids toward 0: worse than RTN)."""
    w, _ = _correlated_layer(2)
    w[3, 5] = 12.0  # an outlier stretches the uniform grid
    w = w * scale
    err = {}
    for method in ("rtn", "kmeans"):
        layer, _ = codebook_from_dense(w, None, CodebookConfig(bits=3, group_size=8, method=method, block_size=block))
        err[method] = float((layer.weight.detach().float() - w).pow(2).sum())
    assert err["kmeans"] < err["rtn"], err


@pytest.mark.parametrize("seed", range(2))
def test_block_jlcm_beats_kmeans_beats_rtn(seed: int) -> None:
    w, sigma = _correlated_layer(seed)
    losses = {}
    for method in ("rtn", "kmeans", "gptq", "jlcm"):
        cfg = CodebookConfig(bits=3, group_size=16, block_size=32, method=method, steps=8, error_feedback=1)
        layer, _ = codebook_from_dense(w, None, cfg, sigma)
        losses[method] = _loss(layer, w, sigma)
    assert losses["jlcm"] < losses["kmeans"] < losses["rtn"], losses
    assert losses["jlcm"] < losses["gptq"] < losses["rtn"], losses


def test_block_compress_save_reload(tmp_path: Path) -> None:
    arch = ARCHS[0]
    model = tiny_model(arch)
    inputs = arch.inputs()
    plan = CompressionConfig(modules={arch.mlp_pattern: CodebookConfig(bits=3, block_size=16, steps=2)})
    hf_compress.compress(model, plan, calibration=calibration_batches(arch), progress=False)
    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    assert layers and all(m.block_size == 16 and m.offsets is not None for m in layers)
    logits = _out(model, inputs)
    model.save_pretrained(tmp_path)
    assert torch.equal(_out(arch.auto_class.from_pretrained(tmp_path), inputs), logits)
    assert "offsets" in {n.rsplit(".", 1)[-1] for n in mark_codebooks_trainable(model)}


def test_bad_block_size_rejected() -> None:
    with pytest.raises(ValueError, match=r"block_size 3 must be a multiple of vector_dim 2"):
        CodebookConfig(bits=4, vector_dim=2, block_size=3)
    with pytest.raises(ValueError, match=r"block_size must be a positive int"):
        CodebookConfig(block_size=0)
    with pytest.raises(ValueError, match=r"block_size 24 must divide in_features 64"):
        codebook_from_dense(torch.randn(8, 64), None, CodebookConfig(bits=2, method="rtn", block_size=24))


def test_weighted_kmeans_does_not_depend_on_the_weights_scale() -> None:
    from hf_compress.methods.codebook_fit import kmeans_codebooks

    g = torch.Generator().manual_seed(0)
    points, h = torch.rand(8, 16, 1, generator=g), torch.rand(8, 16, 1, generator=g) + 0.5
    book = torch.zeros(8, dtype=torch.long)
    ref = kmeans_codebooks(points, book, 1, 4, 5, 0, h)
    for factor in (1e-2, 1e-4, 1e3):
        assert torch.allclose(kmeans_codebooks(points, book, 1, 4, 5, 0, h * factor), ref, atol=1e-6)


def test_codebook_layer_with_more_rows_than_16_bit_indices_round_trips(tmp_path: Path) -> None:
    """Row permutations of tables with > 65,536 rows need 17+ bits per index (Gemma-3's 262k, Qwen's 151k, Llama-3's
    128k vocabularies): packing refused them ('bit width must be an int in 1..16, got 17')."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70_000, 8, generator=g)
    layer, _ = codebook_from_dense(w, None, CodebookConfig(bits=4, method="rtn"))
    assert perm_bits(70_000) == 17 and layer.perm.numel() == -(-70_000 * 17 // 8)
    assert torch.equal(torch.sort(layer.permutation()).values, torch.arange(70_000))
    assert float((layer.weight.float() - w).pow(2).mean() / w.pow(2).mean()) < 0.05
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "l.safetensors")
    again = CodebookLinear.from_spec(layer.spec())
    again.load_state_dict(load_file(tmp_path / "l.safetensors"))
    assert torch.equal(again.weight, layer.weight)


@pytest.mark.parametrize("table", [False, True], ids=["linears", "linears+table"])
def test_codebooks_saved_while_training_reload_as_saved(table: bool, tmp_path: Path) -> None:
    """A checkpoint saved with fp32 master codebooks (a Trainer save_steps checkpoint, before freeze_codebooks)
    reloads them in fp32: they were cast to fp16 on load (logits off by ~2 %). After freeze_codebooks the save is
    fp16 storage again."""
    import transformers

    arch = ARCHS[0]
    modules = {arch.mlp_pattern: CodebookConfig(bits=2, method="rtn"),
               **({"embed_tokens": CodebookConfig(bits=4, method="rtn")} if table else {})}
    model = hf_compress.compress(tiny_model(arch), CompressionConfig(modules=modules), progress=False)
    mark_codebooks_trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path / "training")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "training")
    layers = [m for m in again.modules() if isinstance(m, CodebookLinear)]
    assert layers and all(m.codebooks.dtype == torch.float32 and not m.codebooks.requires_grad for m in layers)
    model.eval()
    assert torch.equal(_out(again, {"input_ids": ids}), _out(model, {"input_ids": ids}))
    freeze_codebooks(model)
    model.save_pretrained(tmp_path / "frozen")
    frozen = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "frozen")
    assert all(m.codebooks.dtype == torch.float16 for m in frozen.modules() if isinstance(m, CodebookLinear))
    assert torch.equal(_out(frozen, {"input_ids": ids}), _out(model, {"input_ids": ids}))


def test_scales_trained_alone_reload_as_saved(tmp_path: Path) -> None:
    """The saved storage dtype is the widest of codebooks, scales and offsets (fp32 scales reloaded as fp16)."""
    import transformers

    arch = ARCHS[0]
    model = hf_compress.compress(tiny_model(arch), CompressionConfig(
        modules={arch.mlp_pattern: CodebookConfig(bits=2, method="rtn")}), progress=False)
    layer = next(m for m in model.modules() if isinstance(m, CodebookLinear))
    layer.scales.requires_grad_(True)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.sum().backward()  # the training forward makes the trainable scales fp32 masters
    with torch.no_grad():
        layer.scales.mul_(1.0001)
    assert layer.scales.dtype == torch.float32 and layer.codebooks.dtype == torch.float16
    model.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    loaded = next(m for m in again.modules() if isinstance(m, CodebookLinear))
    assert loaded.scales.dtype == torch.float32 and torch.equal(loaded.scales, layer.scales)
    assert torch.equal(_out(again.eval(), {"input_ids": ids}), _out(model.eval(), {"input_ids": ids}))


def test_a_trained_then_frozen_model_casts_and_lookup_follows_the_permutation() -> None:
    """freeze_codebooks drops the fp32 grads a training loop leaves (a later model.to(bf16) failed on them); the
    lookup decode follows an in-place write to the row permutation (its cached inverse was kept)."""
    llama = ARCHS[0]
    model = hf_compress.compress(tiny_model(llama), CompressionConfig(
        modules={"mlp.gate_proj": CodebookConfig(bits=3, method="rtn", block_size=16)}), progress=False)
    mark_codebooks_trainable(model)
    ids = llama.inputs()["input_ids"]
    model(ids, labels=ids).loss.backward()  # a manual loop: grads left on the parameters after the step
    freeze_codebooks(model)
    model.to(torch.bfloat16)
    assert model(ids).logits.dtype == torch.bfloat16
    layer = model.model.layers[0].mlp.gate_proj.float()
    layer.mode = "lookup"
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        layer(x)
        perm = layer.permutation().flip(0)
        layer.perm.copy_(pack_bits(perm, perm_bits(layer.out_features)))
        after = layer(x)
        layer.clear_cache()
        assert torch.equal(after, layer(x))


def test_fp32_masters_in_a_state_dict_load_unrounded() -> None:
    """Storage trained without mark_codebooks_trainable becomes fp32 on the first training forward; a Trainer
    checkpoint of it loads into a fresh (fp16) model as fp32, unrounded (it was rounded to fp16, and a resumed Adam
    then failed on fp16 moments next to fp32 parameters)."""
    llama = ARCHS[0]
    plan = CompressionConfig(modules={"mlp.gate_proj": CodebookConfig(bits=3, method="kmeans")})
    trained = hf_compress.compress(tiny_model(llama), plan, progress=False)
    layer = trained.model.layers[0].mlp.gate_proj
    layer.codebooks.requires_grad_(True)
    ids = llama.inputs()["input_ids"]
    trained(ids, labels=ids).loss.backward()  # promoted to fp32 masters
    with torch.no_grad():
        layer.codebooks.add_(1e-4)  # a value fp16 cannot hold
    assert layer.codebooks.dtype == torch.float32
    fresh = hf_compress.compress(tiny_model(llama), plan, progress=False)
    assert fresh.model.layers[0].mlp.gate_proj.codebooks.dtype == torch.float16
    fresh.load_state_dict(trained.state_dict())
    loaded = fresh.model.layers[0].mlp.gate_proj.codebooks
    assert loaded.dtype == torch.float32 and torch.equal(loaded, layer.codebooks)


@pytest.mark.parametrize("bits", [1, 3, 8, 13, 31])
def test_packing_in_chunks_gives_the_same_bytes(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors pack / unpack a chunk at a time (Gemma-3's table: 167M codes took over 10 GB at once)."""
    from hf_compress import packing

    values = torch.randint(0, 1 << bits, (10_007,), generator=torch.Generator().manual_seed(bits))
    whole = pack_bits(values, bits)
    monkeypatch.setattr(packing, "_CHUNK", 8 * 37)
    assert torch.equal(pack_bits(values, bits), whole)
    assert torch.equal(unpack_bits(whole, bits, values.numel()), values)


def test_row_grouping_of_a_tall_table_in_many_groups_skips_the_kmeans(monkeypatch: pytest.MonkeyPatch) -> None:
    """rows × groups above the limit: the principal-direction chunks are the groups (the balanced k-means held a
    [rows, groups] distance matrix: 17 GB for Gemma-3's table at 8 bits); below it, the k-means refines them."""
    from hf_compress.methods import codebook_fit

    w = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 2, 512)[:, None]
    refined = codebook_fit.similar_row_groups(w, 16)
    monkeypatch.setattr(codebook_fit, "_REFINE_LIMIT", 512 * 16 - 1)
    chunks = codebook_fit.similar_row_groups(w, 16)
    assert sorted(chunks.tolist()) == list(range(512)) and not torch.equal(chunks, refined)
    monkeypatch.setattr(codebook_fit, "_balanced_assign", lambda *a: pytest.fail("k-means ran above the limit"))
    assert torch.equal(codebook_fit.similar_row_groups(w, 16), chunks)
