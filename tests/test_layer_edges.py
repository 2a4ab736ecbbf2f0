"""Edge cases every compressed layer must survive: caches built in inference mode, caches after
``load_state_dict``, empty inputs, half-precision models, and clear errors for bad Tucker / packing input."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import ARCHS, EMBED, tiny_model

import hf_compress
from hf_compress import CompressionConfig, LowRankLinear
from hf_compress.layers.codebook import CodebookLinear
from hf_compress.layers.codebook_embedding import CodebookEmbedding
from hf_compress.layers.subspace import SubspaceEmbedding
from hf_compress.layers.tt_embedding import TTEmbedding
from hf_compress.layers.tt_matrix import AdaptiveRankEmbedding, TTMatrixEmbedding
from hf_compress.layers.tucker import TuckerLinear
from hf_compress.methods.jlcm import CodebookConfig
from hf_compress.packing import pack_bits, unpack_bits


def _codebook_linear(mode: str = "cached", trainable: bool = False, out: int = 8, inn: int = 16,
                     bias: bool = True) -> CodebookLinear:
    g = torch.Generator().manual_seed(0)
    layer = CodebookLinear.from_codes(torch.randint(0, 4, (out, inn), generator=g), torch.randperm(out, generator=g),
                                      torch.randn(1, 4, 1, generator=g), torch.ones(1),
                                      torch.zeros(out) if bias else None, 2, dtype=torch.float32)
    layer.mode = mode
    return layer.requires_grad_(trainable)


def _adaptive() -> AdaptiveRankEmbedding:
    torch.manual_seed(0)
    layer = AdaptiveRankEmbedding(10, 8, [4, 2], [4, 6])
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    return layer


def _embeddings() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    table = torch.randn(12, 8)
    sub = SubspaceEmbedding(12, 8, 4, num_subspaces=2)
    for t in sub.tables:
        torch.nn.init.normal_(t)
    return {
        "tt": TTEmbedding.from_dense(table, [2, 4], ranks=[2]),
        "tt_matrix": TTMatrixEmbedding.from_dense(table, [4, 4], [2, 4], [3]),
        "adaptive": _adaptive(),
        "subspace": sub,
        "codebook": CodebookEmbedding.from_codebook(_codebook_linear(out=12, inn=8, bias=False)),
    }


# name -> (inference-mode call, then the same call with autograd): caches built in the first must not break the second
CACHED_CALLS: dict[str, Callable[[], Callable[[bool], torch.Tensor]]] = {
    "codebook_frozen": lambda: (lambda layer, x: lambda grad: layer(x.requires_grad_(grad)))(
        _codebook_linear(), torch.randn(3, 16)),
    "codebook_lookup_trainable": lambda: (lambda layer, x: lambda grad: layer(x))(
        _codebook_linear("lookup", trainable=True), torch.randn(3, 16)),
    "adaptive_logits": lambda: (lambda layer, h: lambda grad: layer.logits(h))(_adaptive(), torch.randn(2, 8)),
}


@pytest.mark.parametrize("name", list(CACHED_CALLS))
def test_caches_built_in_inference_mode_serve_training(name: str) -> None:
    call = CACHED_CALLS[name]()
    with torch.inference_mode():
        expected = call(False).clone()
    out = call(True)
    out.sum().backward()  # raised "Inference tensors cannot be saved for backward"
    assert torch.allclose(out.detach(), expected)


def test_adaptive_logits_follow_a_loaded_token_layout() -> None:
    src, dst = _adaptive(), _adaptive()
    with torch.no_grad():
        src.tier.copy_(torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 1, 1], dtype=src.tier.dtype))
        src.slot.copy_(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5], dtype=src.slot.dtype))
    h = torch.randn(2, 8)
    with torch.no_grad():
        dst.logits(h)  # caches the token order of dst's layout
        dst.load_state_dict(src.state_dict())  # copies in place: same storage
        assert torch.allclose(dst.logits(h), h @ dst.weight.T, atol=1e-5)


@pytest.mark.parametrize("name", ["tt", "tt_matrix", "adaptive", "subspace", "codebook"])
def test_empty_and_odd_id_tensors(name: str) -> None:
    layer = _embeddings()[name]
    table, v = layer.weight.detach(), layer.num_embeddings
    for ids in (torch.empty(2, 0, dtype=torch.long), torch.tensor(5), torch.randint(0, v, (3, 2)).t(),
                torch.randint(0, v, (2, 3), dtype=torch.int32)):
        out = layer(ids)
        assert out.shape == (*ids.shape, 8)
        assert torch.allclose(out, table[ids.long()], atol=1e-5)
    for bad in (torch.tensor([0, v]), torch.tensor([[-1, 0]])):  # a clear error, as nn.Embedding's IndexError
        with pytest.raises(IndexError, match=rf"token id out of range \[0, {v}\) for {type(layer).__name__}"):
            layer(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS[:2], ids=[a.name for a in ARCHS[:2]])
@pytest.mark.parametrize("when", ["cast_after", "compressed_in_dtype"])
def test_codebook_embedding_runs_in_the_model_dtype(arch: object, dtype: torch.dtype, when: str) -> None:
    model = tiny_model(arch)
    cfg = CompressionConfig(modules={EMBED[arch.name]: CodebookConfig(bits=4, method="kmeans", steps=1)})
    if when == "compressed_in_dtype":  # a model loaded with dtype=..., then compressed
        model.to(dtype)
    hf_compress.compress(model, cfg, progress=False)
    if when == "cast_after":
        model.to(dtype)
    ids = arch.inputs()["input_ids"]
    assert model.get_input_embeddings()(ids).dtype == dtype
    with torch.no_grad():
        logits = model(ids).logits  # raised "expected m1 and m2 to have the same dtype"
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_tucker_from_dense_rejects_missing_or_unmeetable_ranks() -> None:
    linear = torch.nn.Linear(16, 16)
    with pytest.raises(ValueError, match="give ranks"):
        TuckerLinear.from_dense(linear, head_dim=4)
    with pytest.raises(ValueError, match="fit max_params=10"):
        TuckerLinear.from_dense(linear, head_dim=4, max_params=10)
    with pytest.raises(ValueError, match="heads_on must be"):
        TuckerLinear.from_dense(linear, head_dim=4, ranks=(2, 2, 2), heads_on="side")


def test_pack_bits_checks_the_range_before_narrowing() -> None:
    with pytest.raises(ValueError, match=r"values must lie in \[0, 16\)"):
        pack_bits(torch.tensor([2**32 + 3]), 4)
    values = torch.tensor([3, 0, 15, 7])
    assert torch.equal(unpack_bits(pack_bits(values, 4), 4, 4).long(), values)


def test_memoized_grouping_tells_equal_bytes_of_other_shapes_apart() -> None:
    from hf_compress.methods.codebook_fit import group_rows

    assert group_rows(torch.zeros(8, 4), 2).shape == (8,)
    assert group_rows(torch.zeros(4, 8), 2).shape == (4,)  # same bytes, other layout: was the cached [8] result


@pytest.mark.parametrize("name", ["tt", "tt_matrix", "adaptive", "subspace"])  # codebooks train via fp32 copies
def test_lookup_under_bf16_autocast_trains(name: str) -> None:
    layer = _embeddings()[name]
    ids = torch.randint(0, layer.num_embeddings, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Trainer(bf16=True) on CPU
        out = layer(ids)
    out.float().sum().backward()  # raised "Index put requires the source and destination dtypes match"
    assert any(p.grad is not None for p in layer.parameters())


def test_codebook_storage_is_frozen_after_compress_and_reload(tmp_path: object) -> None:
    """A plain Trainer must not run Adam on fp16 codebooks (its second moment underflows): they train only through
    mark_codebooks_trainable's fp32 copies."""
    arch = ARCHS[0]
    model = hf_compress.compress(tiny_model(arch), CompressionConfig(modules={arch.mlp_pattern: CodebookConfig(
        bits=3, method="kmeans")}), progress=False)
    model.save_pretrained(tmp_path)
    for m in (model, arch.auto_class.from_pretrained(tmp_path)):
        stored = [p for n, p in m.named_parameters() if n.endswith(("codebooks", "scales", "offsets"))]
        assert stored and not any(p.requires_grad for p in stored)


@pytest.mark.parametrize("negative", [False, True])  # row 3 given as 3 - V, as nn.Embedding reads it
@pytest.mark.parametrize("name", list(_embeddings()))
def test_padding_rows_give_no_gradient_like_nn_embedding(name: str, negative: bool) -> None:
    layer = _embeddings()[name]
    layer.padding_idx = 3 - layer.num_embeddings if negative else 3
    trainable = [p for p in layer.parameters() if p.is_floating_point()]
    for p in trainable:
        p.requires_grad_(True)

    def grads(ids: list[int]) -> list[torch.Tensor]:
        layer.zero_grad()
        (layer(torch.tensor(ids)) * torch.arange(1.0, layer.embedding_dim + 1)).sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainable]

    assert all(g.abs().sum() == 0 for g in grads([3, 3]))
    assert any(g.abs().sum() > 0 for g in grads([0]))
    for with_pad, without in zip(grads([0, 3, 5]), grads([0, 5])):
        assert torch.allclose(with_pad, without)
    with torch.no_grad():
        assert torch.equal(layer(torch.tensor([3])), layer.rows(torch.tensor([3])))  # the value is unchanged


@pytest.mark.parametrize(("build", "message"), [
    (lambda: TTEmbedding.from_dense(torch.randn(10, 12), [3, 4]), "exactly one of ranks or eps"),
    (lambda: TTEmbedding.from_dense(torch.randn(10, 12), [3, 5], ranks=[2]), r"TT shape \[3, 5\] has product 15"),
    (lambda: TTEmbedding.from_dense(torch.randn(10, 12), [3, 4], ranks=[2, 2]), "needs 1 inner ranks"),
    (lambda: TuckerLinear.from_dense(torch.nn.Linear(64, 64), 8, ranks=(1, 1)), "Tucker ranks are three"),
    (lambda: TuckerLinear.from_dense(torch.nn.Linear(64, 64), 8, energy=2.0), r"energy must be a fraction in \(0, 1\]"),
    (lambda: TTMatrixEmbedding.from_dense(torch.randn(40, 12), [4, 4], [3, 4], [2]), "whose product covers V"),
    (lambda: TTMatrixEmbedding.from_dense(torch.randn(40, 12), [8, 8], [3, 4], [500]), "r_1 = 500 exceeds"),
    (lambda: LowRankLinear.from_factors(torch.randn(8, 3), torch.randn(4, 6), None), r"needs up \[out, r\]"),
])
def test_layer_builders_name_bad_arguments(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
