"""Tensor-train embeddings (TensorSLM) and the other table formats on every covered architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ARCHS, EMBED, Arch, run_save_reload, tiny_model
from conftest import model_output as _out
from conftest import short_generate as _generate

import hf_compress
from hf_compress import CompressionConfig
from hf_compress.layers.tt_embedding import CompressedEmbedding, TiedEmbeddingHead, TTEmbedding, contract_cores
from hf_compress.methods.tt_adaptive import (
    HEAD_WEIGHTS,
    adaptive_factors,
    count_tokens,
    next_token_loss,
    probe_batches,
)
from hf_compress.methods.tt_embedding import TTEmbeddingConfig, build_embedding, prepare_tt
from hf_compress.methods.tt_ranks import reachable_ranks
from hf_compress.vocab import add_tokens, prune_tokens

TIED = {"llama", "gpt2", "whisper"}
LLAMA = next(a for a in ARCHS if a.name == "llama")
FORMATS = ["per_token", "adaptive", "tt_matrix", "svd"]
CASES = [(a, f) for a in ARCHS for f in FORMATS]


def _calibration(arch: Arch) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 24, (2, 16), generator=g)]  # low ids frequent: the adaptive format ranks them higher


def _compress(arch: Arch, fmt: str = "adaptive", **kwargs: object) -> torch.nn.Module:
    model = tiny_model(arch)
    plan = CompressionConfig(modules={EMBED[arch.name]: TTEmbeddingConfig(format=fmt, **kwargs)})
    return hf_compress.compress(model, plan, calibration=_calibration(arch), progress=False)


@pytest.mark.parametrize(("arch", "fmt"), CASES, ids=[f"{a.name}-{f}" for a, f in CASES])
def test_compress_generate_save_reload_exact(arch: Arch, fmt: str, tmp_path: Path) -> None:
    model = _compress(arch, fmt)
    emb = model.get_input_embeddings()
    assert isinstance(emb, CompressedEmbedding)
    v, d = arch.make_config().vocab_size, emb.embedding_dim
    assert sum(p.numel() for p in emb.parameters()) <= v * d / 2
    if arch.name in TIED:
        assert isinstance(model.get_output_embeddings(), TiedEmbeddingHead)
    again, inputs, logits = run_save_reload(model, arch, tmp_path)
    assert type(again.get_input_embeddings()) is type(emb)
    assert torch.equal(_out(again, inputs), logits)
    if arch.generates:
        assert torch.equal(_generate(again, arch, inputs), _generate(model, arch, inputs))


def test_per_token_full_rank_reproduces_table() -> None:
    w = torch.randn(200, 60, generator=torch.Generator().manual_seed(0))
    layer = build_embedding(w, TTEmbeddingConfig(format="per_token", shape=[3, 4, 5], ranks=[3, 5]))
    assert isinstance(layer, TTEmbedding)
    assert layer.cores[0].shape == (200, 1, 3, 3) and layer.cores[2].shape == (200, 5, 5, 1)
    assert (layer.weight - w).abs().max() < 1e-5
    g = torch.Generator().manual_seed(1)  # rows of TT rank [2, 2] + noise: a tolerance that compresses
    cores = [torch.randn(200, 1, 3, 2, generator=g), torch.randn(200, 2, 4, 2, generator=g),
             torch.randn(200, 2, 5, 1, generator=g)]
    w = contract_cores(cores) + 0.05 * torch.randn(200, 60, generator=g)
    tol = build_embedding(w, TTEmbeddingConfig(format="per_token", shape=[3, 4, 5], eps=0.3))
    assert tol.ranks == [2, 2]
    err = (tol.weight - w).norm(dim=1) / w.norm(dim=1)
    assert err.max() <= 0.3 + 1e-4
    loose = build_embedding(w, TTEmbeddingConfig(format="per_token", shape=[3, 4, 5], eps=0.95))
    assert sum(loose.ranks) <= sum(tol.ranks) and ((loose.weight - w).norm(dim=1) / w.norm(dim=1)).max() <= 0.95


def test_lookup_reconstructs_only_selected_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    for fmt in FORMATS:
        layer = build_embedding(w, TTEmbeddingConfig(format=fmt, compression=1.5))
        full = layer.weight
        ids = torch.tensor([[3, 499], [0, 3]])
        monkeypatch.setattr(type(layer), "weight", property(lambda self: pytest.fail("table materialized")))
        out = layer(ids)
        monkeypatch.undo()
        assert out.shape == (2, 2, 64) and torch.allclose(out, full[ids], atol=1e-5), fmt


@pytest.mark.parametrize("order", [3, 4, 5])
def test_chosen_ranks_are_all_filled_by_tt_svd(order: int) -> None:
    """Every rank the budget search picks can be filled (no all-zero core slices: r_k <= r_(k-1)·n_k and
    r_k <= n_(k+1)·r_(k+1)), so the budget buys error reduction."""
    g = torch.Generator().manual_seed(order)
    w = torch.randn(200, 256, generator=g)
    for ratio in (1.5, 2.0, 3.0):
        layer = build_embedding(w, TTEmbeddingConfig(format="per_token", compression=ratio, order=order))
        assert reachable_ranks(layer.shape, layer.ranks) == layer.ranks
        for core in layer.cores[:-1]:  # [V, r_(k-1), n_k, r_k]: every output slice used by some token
            assert (core.detach().abs().amax((0, 1, 2)) > 0).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_budget_is_respected_and_error_ordered(fmt: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 16, generator=g) @ torch.randn(16, 64, generator=g)
    w = w + 0.05 * torch.randn(1000, 64, generator=g)
    errs = []
    for ratio in (1.5, 3.0):
        layer = build_embedding(w, TTEmbeddingConfig(format=fmt, compression=ratio))
        stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())  # index buffers included
        assert w.numel() * 4 / 8 < stored <= w.numel() * 4 / ratio
        errs.append(float((layer.weight - w).norm() / w.norm()))
    assert errs[0] <= errs[1] + 1e-6


def test_adaptive_gives_frequent_tokens_more_rank() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(400, 64, generator=g)
    counts = torch.zeros(400, dtype=torch.float64)
    counts[:20] = 1000.0
    layer = build_embedding(w, TTEmbeddingConfig(format="adaptive", compression=2.0, prior="none"), counts)
    err = (layer.weight - w).norm(dim=1) / w.norm(dim=1)
    assert err[:20].max() < 1e-5 < err[20:].mean()


def test_row_metric_minimizes_the_metric_weighted_error() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 32, generator=g)
    a = torch.randn(32, 32, generator=g)
    metric = a @ a.T / 32 + 0.05 * torch.eye(32)  # anisotropic, like a head's input second moments

    def table(m: torch.Tensor | None) -> torch.Tensor:
        basis, coeffs, _, _ = adaptive_factors(w, 0.0, None, 1, single_rank=8, metric=m)
        return coeffs[0] @ basis

    def m_err(t: torch.Tensor) -> float:
        d = t - w
        return float(torch.einsum("vi,ij,vj->", d, metric, d))

    assert torch.allclose(table(torch.eye(32)), table(None), atol=1e-4)  # identity metric = plain truncated SVD
    assert m_err(table(metric)) < 0.9 * m_err(table(None))  # the metric-optimal rank-8 fit beats the plain one
    with pytest.raises(ValueError, match="positive definite"):
        adaptive_factors(w, 0.0, None, 1, single_rank=8, metric=-torch.eye(32))


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in TIED], ids=lambda a: a.name)
def test_head_metric_uses_calibration_and_reloads_exactly(arch: Arch, tmp_path: Path) -> None:
    plain = _compress(arch, metric="identity")
    calibration: list = _calibration(arch)
    if arch.name == "whisper":  # the head statistics need audio with its transcript; bare ids only count tokens
        calibration = [*calibration, arch.inputs(seed=3)]
    weighted = hf_compress.compress(tiny_model(arch), CompressionConfig(modules={EMBED[arch.name]: TTEmbeddingConfig(
        metric="head")}), calibration=calibration, progress=False)
    assert not torch.equal(plain.get_input_embeddings().weight, weighted.get_input_embeddings().weight)
    again, inputs, logits = run_save_reload(weighted, arch, tmp_path)
    assert torch.equal(_out(again, inputs), logits)
    with pytest.raises(ValueError, match=r"metric='head'.*calibration"):
        plan = CompressionConfig(modules={EMBED[arch.name]: TTEmbeddingConfig(metric="head")})
        hf_compress.compress(tiny_model(arch), plan, progress=False)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in TIED], ids=lambda a: a.name)
def test_auto_metric_keeps_the_lowest_calibration_loss(arch: Arch, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    if arch.name == "whisper":  # bare ids count tokens (held out of the probe); audio with its transcript is probed
        calibration: list = [*_calibration(arch), arch.inputs(seed=3)]
    else:  # more than the probe's 4096 tokens: the probe is the first batch, the second is counted only
        calibration = [torch.randint(0, 24, (72, 64), generator=g), torch.randint(0, 40, (72, 64), generator=g)]
    model = hf_compress.compress(tiny_model(arch), CompressionConfig(modules={EMBED[arch.name]: TTEmbeddingConfig(
        compression=3.0)}), calibration=calibration, progress=False)  # metric="auto" is the default
    choice = model.get_input_embeddings().metric_choice
    losses = {float(k): v for k, v in choice["probe_loss"].items()}
    assert set(losses) == set(HEAD_WEIGHTS) and choice["head_weight"] == min(losses, key=losses.get)
    assert max(losses.values()) - min(losses.values()) > 1e-4  # the candidates really differ
    again, inputs, logits = run_save_reload(model, arch, tmp_path)
    assert torch.equal(_out(again, inputs), logits)
    dense = tiny_model(arch)
    name = next(n for n, m in dense.named_modules() if m is dense.get_input_embeddings())
    state = prepare_tt(dense, {name: TTEmbeddingConfig(compression=3.0)}, calibration)[name]
    v = dense.get_input_embeddings().num_embeddings
    runnable = ([b for b in calibration if isinstance(b, dict)] if arch.name == "whisper"
                else [r[None] for b in calibration for r in b])  # id batches are probed row by row
    probe = probe_batches(runnable, seq2seq=arch.name == "whisper")
    assert len(state["probe"]) == len(probe) <= len(runnable)
    assert arch.name == "whisper" or len(probe) == 4096 // 64  # ~PROBE_TOKENS of rows, not the whole first batch
    for got, want in zip(state["probe"], probe):
        assert got is want if arch.name == "whisper" else torch.equal(got, want)
    held_out = (count_tokens(calibration, v) - count_tokens(probe, v)).clamp_min(0)
    assert torch.equal(state["probe_counts"], held_out) and not torch.equal(held_out, state["counts"])
    assert held_out.sum() > 0 and choice["held_out"] is True
    for weight, loss in losses.items():  # each candidate: the dense table, ranks from the held-out counts, probed
        cfg = TTEmbeddingConfig(compression=3.0, metric="head" if weight else "identity", head_weight=weight or 1.0)
        scored = tiny_model(arch)
        table = scored.get_input_embeddings()
        candidate = build_embedding(table.weight, cfg, held_out, special=state["special"],
                                    head_sigma=state["head_sigma"], padding_idx=table.padding_idx)
        with torch.no_grad():
            table.weight.copy_(candidate.weight)  # a tied head reads it too
        assert next_token_loss(scored, probe) == pytest.approx(loss, abs=1e-4)
        if weight == choice["head_weight"]:  # the kept table: that head weight, ranks from all the counts
            fixed = hf_compress.compress(tiny_model(arch), CompressionConfig(modules={EMBED[arch.name]: cfg}),
                                         calibration=calibration, progress=False)
            assert torch.equal(fixed.get_input_embeddings().weight, model.get_input_embeddings().weight)
    plain = _compress(arch, compression=3.0) if arch.name == "whisper" else None  # ids only: identity, no probe
    assert plain is None or not hasattr(plain.get_input_embeddings(), "metric_choice")


def test_auto_metric_on_a_calibration_no_longer_than_the_probe_counts_everything() -> None:
    model = _compress(LLAMA, compression=3.0)  # one batch of 32 tokens: it is all probe
    choice = model.get_input_embeddings().metric_choice
    assert choice["held_out"] is False
    state = prepare_tt(tiny_model(LLAMA), {"model.embed_tokens": TTEmbeddingConfig()}, _calibration(LLAMA))
    assert state["model.embed_tokens"]["probe_counts"] is state["model.embed_tokens"]["counts"]
    g = torch.Generator().manual_seed(0)  # a probe's worth plus 4 tokens: too little left to rank by, all counts
    few = [torch.randint(0, 96, (64, 64), generator=g), torch.randint(0, 96, (1, 4), generator=g)]
    state = prepare_tt(tiny_model(LLAMA), {"model.embed_tokens": TTEmbeddingConfig()}, few)["model.embed_tokens"]
    assert state["probe_counts"] is state["counts"]


def test_next_token_loss_ignores_padding_and_reads_labels() -> None:
    llama = next(a for a in ARCHS if a.name == "llama")
    model = tiny_model(llama)
    ids = torch.randint(0, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], 1).long()
    plain = next_token_loss(model, [ids])
    assert next_token_loss(model, [{"input_ids": padded, "attention_mask": mask}]) == pytest.approx(plain, rel=1e-5)
    labels = padded.masked_fill(mask == 0, -100)
    assert next_token_loss(model, [{"input_ids": padded, "attention_mask": mask, "labels": labels}]
                           ) == pytest.approx(plain, rel=1e-5)
    assert probe_batches([torch.zeros(1, 1, dtype=torch.long), ids]) == [ids]  # one token: nothing to score
    with pytest.raises(ValueError, match="no batch has token ids"):
        next_token_loss(model, [{"attention_mask": mask}])


def test_whisper_calibration_with_labels_only_runs_the_auto_metric() -> None:
    whisper = next(a for a in ARCHS if a.name == "whisper")
    inputs = whisper.inputs(seed=3)
    batch = {"input_features": inputs["input_features"], "labels": inputs["decoder_input_ids"]}
    model = hf_compress.compress(tiny_model(whisper), CompressionConfig(modules={EMBED["whisper"]: TTEmbeddingConfig(
        compression=3.0)}), calibration=[batch], progress=False)
    assert set(model.get_input_embeddings().metric_choice["probe_loss"]) == {f"{w:g}" for w in HEAD_WEIGHTS}


def test_id_rank_prior_favors_low_ids_and_none_is_uniform() -> None:
    w = torch.randn(400, 64, generator=torch.Generator().manual_seed(0))
    err = {}
    for prior in ("id_rank", "none"):
        layer = build_embedding(w, TTEmbeddingConfig(format="adaptive", prior=prior, keep_special=False))
        err[prior] = (layer.weight - w).norm(dim=1) / w.norm(dim=1)
    assert err["id_rank"][:40].mean() < 0.7 * err["id_rank"][-200:].mean()
    assert err["none"][:40].mean() > 0.8 * err["none"][-200:].mean()  # no id preference without the prior
    assert not torch.equal(err["id_rank"], err["none"])


def test_token_counts_validated() -> None:
    with pytest.raises(ValueError, match=r"token counts must be a \[V=400\] vector"):
        build_embedding(torch.randn(400, 64), TTEmbeddingConfig(), torch.ones(399))


def _ranks(layer: torch.nn.Module) -> torch.Tensor:
    return torch.tensor(layer.tier_ranks)[layer.tier.long()]


def test_control_tokens_kept_exact(tmp_path: Path) -> None:
    w = torch.randn(400, 64, generator=torch.Generator().manual_seed(0))
    far = [399, 398]  # high ids: the prior gives them the least weight
    exact = build_embedding(w, TTEmbeddingConfig(exact_ids=far[:1]), special=far[1:])
    assert (exact.weight[far] - w[far]).abs().max() < 1e-5
    plain = build_embedding(w, TTEmbeddingConfig(keep_special=False), special=far[1:])
    assert (plain.weight[far] - w[far]).abs().max() > 1e-2
    arch = next(a for a in ARCHS if a.name == "llama")  # tiny table: no rank-d tier fits, specials get the top rank
    cfg = arch.make_config()
    special = sorted({i for i in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) if isinstance(i, int)})
    model = _compress(arch, exact_ids=[cfg.vocab_size - 1])
    ranks = _ranks(model.get_input_embeddings())
    assert bool((ranks[[*special, cfg.vocab_size - 1]] == ranks.max()).all())
    assert int(_ranks(_compress(arch, keep_special=False, prior="none").get_input_embeddings())[-1]) < ranks.max()
    again, inputs, logits = run_save_reload(model, arch, tmp_path)
    assert torch.equal(_out(again, inputs), logits)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in TIED], ids=lambda a: a.name)
def test_tied_head_compressed_vs_dense_params(arch: Arch) -> None:
    # same table both ways (metric="auto" would weigh the compressed head's logit error into the table)
    compressed = _compress(arch, tied_head="compressed", metric="identity")
    dense = _compress(arch, tied_head="dense", metric="identity")
    v, d = arch.make_config().vocab_size, compressed.get_input_embeddings().embedding_dim
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(dense) - n(compressed) == v * d
    assert type(dense.get_output_embeddings()).__name__ == "Linear"
    assert not dense.config.tie_word_embeddings and not compressed.config.tie_word_embeddings
    assert torch.equal(dense.get_output_embeddings().weight, tiny_model(arch).get_output_embeddings().weight)


@pytest.mark.parametrize(("arch", "head"), [(a, h) for a in ARCHS for h in ("compressed", "dense")],
                         ids=[f"{a.name}-{h}" for a in ARCHS for h in ("compressed", "dense")])
def test_add_prune_save_reload(arch: Arch, head: str, tmp_path: Path) -> None:
    model = _compress(arch, "per_token", ranks=None, compression=1.5, tied_head=head)
    emb = model.get_input_embeddings()
    v, d = emb.num_embeddings, emb.embedding_dim
    new = torch.randn(3, d, generator=torch.Generator().manual_seed(2))
    assert add_tokens(model, None, ["<a>", "<b>", "<c>"], new) == [v, v + 1, v + 2]
    assert emb.num_embeddings == v + 3 and model.config.vocab_size == v + 3
    inputs = arch.inputs()
    key = "decoder_input_ids" if arch.name == "whisper" else "input_ids"
    inputs[key][0, -1] = v + 2
    logits = _out(model, inputs)
    if arch.name in TIED:
        assert logits.shape[-1] == v + 3
    model.save_pretrained(tmp_path / "added")
    assert torch.equal(_out(arch.auto_class.from_pretrained(tmp_path / "added"), inputs), logits)

    old_to_new = prune_tokens(model, None, [5, 6, 7])
    assert old_to_new.shape == (v + 3,) and (old_to_new[[5, 6, 7]] == -1).all() and old_to_new[v + 2] == v - 1
    assert emb.num_embeddings == v and model.config.vocab_size == v
    inputs[key] = old_to_new[inputs[key]].clamp_min(0)
    pruned = _out(model, inputs)
    model.save_pretrained(tmp_path / "pruned")
    assert torch.equal(_out(arch.auto_class.from_pretrained(tmp_path / "pruned"), inputs), pruned)


def test_added_rows_full_rank_exact_and_keep_order() -> None:
    w = torch.randn(50, 24, generator=torch.Generator().manual_seed(0))
    layer = build_embedding(w, TTEmbeddingConfig(format="per_token", shape=[2, 3, 4], ranks=[2, 4]))
    new = torch.randn(2, 24)
    layer.add_rows(new)
    assert torch.allclose(layer(torch.tensor([50, 51])), new, atol=1e-5)
    layer.keep_rows(torch.tensor([51, 0]))
    assert torch.allclose(layer(torch.tensor([0, 1])), torch.stack([new[1], w[0]]), atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"format": "per_token", "shape": [4, 4, 5], "ranks": [2, 2]}, r"product 80, but the embedding dimension is 64"),
    ({"format": "per_token", "shape": [4, 4, 4], "ranks": [0, 2]}, r"rank 0 would erase"),
    ({"format": "per_token", "shape": [4, 4, 4], "ranks": [5, 2]},
     r"r_1 = 5 exceeds the size of unfolding 1.*use r_1 <= 4"),
    ({"format": "per_token", "shape": [4, 4, 4], "ranks": [2]}, r"needs 2 inner ranks"),
    ({"format": "per_token", "shape": [2, 2, 4, 4], "ranks": [1, 4, 2]},
     r"ranks \[1, 4, 2\] over modes \[2, 2, 4, 4\] cannot all be filled.*Use ranks \[1, 2, 2\]"),
    ({"format": "per_token", "eps": 0.01}, r"eps=0.01 needs TT ranks \[4, 4\].*nothing is saved"),
    ({"format": "tt_mat"}, r"format must be one of"),
    ({"tied_head": "shared"}, r"tied_head must be one of"),
    ({"compression": 0.5}, r"compression must be > 1"),
    ({"format": "svd", "ranks": [65]}, r"rank 65 must be in \[1, min\(V, d\) = 64\]"),
    ({"format": "per_token", "compression": 200.0}, r"lower the compression ratio"),
    ({"prior": "zipf"}, r"prior must be one of"),
    ({"prior_weight": -1.0}, r"prior_weight, prior_exponent and frequency_smoothing must be >= 0"),
    ({"exact_ids": [-1]}, r"exact_ids must be token ids >= 0"),
    ({"metric": "fisher"}, r"metric must be one of"),
])
def test_bad_configs_rejected_with_clear_message(kwargs: dict, message: str) -> None:
    arch = next(a for a in ARCHS if a.name == "llama")
    with pytest.raises(ValueError, match=message):
        plan = CompressionConfig(modules={"embed_tokens": TTEmbeddingConfig(**kwargs)})
        hf_compress.compress(tiny_model(arch), plan, progress=False)


def test_non_embedding_target_rejected() -> None:
    arch = next(a for a in ARCHS if a.name == "llama")
    with pytest.raises(TypeError, match=r"compresses nn\.Embedding token tables only"):
        hf_compress.compress(tiny_model(arch), CompressionConfig(modules={"q_proj": TTEmbeddingConfig()}),
                             progress=False)


def test_logits_table_cache_is_exact_and_invalidated() -> None:
    w = torch.randn(300, 60, generator=torch.Generator().manual_seed(0))
    layer = build_embedding(w, TTEmbeddingConfig(format="per_token", shape=[3, 4, 5], ranks=[2, 3]))
    h = torch.randn(4, 60, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = layer.logits(h)
        layer.cache_table = True
        assert torch.equal(layer.logits(h), plain) and "_table_cache" in layer.__dict__
        layer.set_rows(torch.tensor([5]), torch.randn(1, 60, generator=torch.Generator().manual_seed(2)))
        changed = layer.logits(h)
    assert not torch.equal(changed[:, 5], plain[:, 5]) and torch.equal(changed[:, 6], plain[:, 6])
    assert torch.equal(changed, h @ layer.weight.T)
    layer(torch.tensor([1]))
    assert layer.logits(h).requires_grad and "_table_cache" not in layer.__dict__  # no cache while training


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_budget_below_rank_one_is_a_clear_error(fmt: str) -> None:
    from hf_compress.config import BudgetError

    w = torch.randn(96, 48)
    layer = build_embedding(w, TTEmbeddingConfig(format=fmt, compression=2.0))  # reachable: fits
    assert sum(p.numel() * p.element_size() for p in layer.parameters()) <= w.numel() * 4 / 2
    with pytest.raises(BudgetError, match=r"lower (the )?compression"):
        build_embedding(w, TTEmbeddingConfig(format=fmt, compression=400.0))
