"""Codebook token embeddings (JLCM's layout on ``nn.Embedding`` targets), on every covered architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, EMBED, Arch, run_save_reload, tiny_model
from conftest import model_output as _out
from conftest import short_generate as _generate

import hf_compress
from hf_compress import CompressionConfig
from hf_compress.layers.codebook_embedding import CodebookEmbedding
from hf_compress.layers.tt_embedding import TiedEmbeddingHead
from hf_compress.methods.jlcm import CodebookConfig, mark_codebooks_trainable

TIED = {"llama", "gpt2", "whisper"}
CASES = [(a, m) for a in ARCHS for m in ("kmeans", "jlcm")]


@pytest.mark.parametrize(("arch", "method"), CASES, ids=[f"{a.name}-{m}" for a, m in CASES])
def test_compress_generate_save_reload_exact(arch: Arch, method: str, tmp_path: Path) -> None:
    model = tiny_model(arch)
    dense = model.get_input_embeddings().weight.detach().clone()
    plan = CompressionConfig(modules={EMBED[arch.name]: CodebookConfig(bits=4, method=method, steps=2)})
    hf_compress.compress(model, plan, progress=False)  # no calibration: a token table is fitted with Σ = I
    emb = model.get_input_embeddings()
    assert isinstance(emb, CodebookEmbedding) and emb.num_embeddings == dense.shape[0]
    rel = (emb.weight - dense).norm() / dense.norm()
    assert 0 < rel < 0.15, rel  # 16 levels per small row group: close, not exact
    ids = torch.tensor([[0, 5, 7]])
    assert torch.equal(emb(ids)[0], emb.weight[ids[0]] * (emb.embed_scale or 1.0))
    if arch.name in TIED:
        head = model.get_output_embeddings()
        assert isinstance(head, TiedEmbeddingHead) and head.embedding is emb
        h = torch.randn(3, emb.embedding_dim)
        assert torch.allclose(head(h)[..., : emb.num_embeddings], h @ emb.weight.T, atol=1e-5)
    again, inputs, logits = run_save_reload(model, arch, tmp_path)
    specs = json.loads((tmp_path / "config.json").read_text())["compression_config"]["layers"]
    assert "codebook_embedding" in {s["type"] for s in specs.values()}
    assert type(again.get_input_embeddings()) is CodebookEmbedding
    assert torch.equal(_out(again, inputs), logits)
    if arch.generates:
        assert torch.equal(_generate(again, arch, inputs), _generate(model, arch, inputs))


def test_jlcm_table_no_worse_than_kmeans() -> None:
    arch = ARCHS[0]
    errs = {}
    for method in ("kmeans", "jlcm"):
        model = tiny_model(arch)
        dense = model.get_input_embeddings().weight.detach().clone()
        plan = CompressionConfig(modules={EMBED[arch.name]: CodebookConfig(bits=3, method=method, steps=4)})
        hf_compress.compress(model, plan, progress=False)
        errs[method] = float((model.get_input_embeddings().weight.detach() - dense).pow(2).sum())
    assert errs["jlcm"] <= errs["kmeans"] * (1 + 1e-6)


def test_mixed_with_calibrated_linear_codebooks(tmp_path: Path) -> None:
    arch = next(a for a in ARCHS if a.name == "llama")
    model = tiny_model(arch)
    plan = CompressionConfig(modules={EMBED["llama"]: CodebookConfig(bits=4, method="jlcm", steps=1),
                                      arch.mlp_pattern: CodebookConfig(bits=3, method="jlcm", steps=1)})
    calib = [arch.inputs(seed=s)["input_ids"] for s in range(2)]
    hf_compress.compress(model, plan, calibration=calib, progress=False)
    again, inputs, logits = run_save_reload(model, arch, tmp_path)
    assert torch.equal(_out(again, inputs), logits)
    dense_bytes = 4 * model.config.vocab_size * model.config.hidden_size
    assert sum(model.get_input_embeddings().storage_bytes().values()) < dense_bytes / 4


def test_codebooks_train_through_lookup_and_tied_head() -> None:
    arch = next(a for a in ARCHS if a.name == "llama")
    model = tiny_model(arch)
    hf_compress.compress(model, CompressionConfig(modules={EMBED["llama"]: CodebookConfig(bits=4, method="kmeans")}),
                         progress=False)
    names = mark_codebooks_trainable(model, norms=False, biases=False)
    assert any("embed_tokens.table.codebooks" in n for n in names)
    emb = model.get_input_embeddings()
    before = emb.weight.detach().clone()
    ids = arch.inputs()["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert emb.table.codebooks.grad is not None and emb.table.codebooks.grad.abs().sum() > 0
    with torch.no_grad():
        emb.table.codebooks.add_(0.01)
    assert not torch.equal(emb.weight, before)  # the decoded-table cache follows codebook edits


def test_bad_embedding_layouts_rejected() -> None:
    model = tiny_model(ARCHS[0])
    too_many = CompressionConfig(modules={EMBED[ARCHS[0].name]: CodebookConfig(bits=4, vector_dim=5)})
    with pytest.raises(ValueError, match="vector_dim 5 must be >= 1 and divide in_features"):
        hf_compress.compress(model, too_many, progress=False)
    with pytest.raises(ValueError, match="CodebookEmbedding"):
        from hf_compress.layers.codebook import CodebookLinear

        CodebookEmbedding(10, 8, CodebookLinear(8, 12, bits=2, bias=False))


def test_table_sigma_adds_the_tied_heads_statistics() -> None:
    from hf_compress.methods.jlcm_embedding import table_sigma

    assert torch.equal(table_sigma(4, None), torch.eye(4))
    head = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0]))
    sigma = table_sigma(4, head)
    assert torch.allclose(torch.diagonal(sigma), torch.tensor([3.0, 2.0, 1.5, 1.5]))  # I + head · d / tr(head)


def test_calibrated_table_uses_the_head_and_beats_identity_on_logits() -> None:
    """With calibration, a tied table's codes follow the head's input statistics: lower logit error than Σ = I."""
    arch = next(a for a in ARCHS if a.name == "llama")
    calib = [arch.inputs(seed=s, batch=4, seq=16)["input_ids"] for s in range(3)]
    hidden = {}
    errs = {}
    for use_calibration in (False, True):
        model = tiny_model(arch)
        dense = model.get_input_embeddings().weight.detach().clone()
        model.lm_head.register_forward_hook(lambda m, a, o: hidden.__setitem__("h", a[0].detach()))
        with torch.no_grad():
            model(input_ids=calib[0])
        h = hidden["h"].reshape(-1, dense.shape[1])
        plan = CompressionConfig(modules={EMBED["llama"]: CodebookConfig(bits=2, method="jlcm", steps=3)})
        hf_compress.compress(model, plan, calibration=calib if use_calibration else None, progress=False)
        w = model.get_input_embeddings().weight.detach()
        errs[use_calibration] = float((h @ (w - dense).T).pow(2).mean())
    assert errs[True] < errs[False]
