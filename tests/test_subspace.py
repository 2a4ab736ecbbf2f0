"""Subspace embeddings (Jaiswal & Liu, CIKM'23): modulo and context assignment on every covered architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from conftest import ARCHS, EMBED, Arch, run_save_reload, tiny_model
from conftest import model_output as _out
from conftest import short_generate as _generate

import hf_compress
from hf_compress import CompressionConfig
from hf_compress.layers.subspace import SubspaceEmbedding, modulo_codes
from hf_compress.layers.tt_embedding import TiedEmbeddingHead
from hf_compress.methods.subspace import (
    SubspaceEmbeddingConfig,
    build_subspace,
    distill,
    distillation_loss,
    distinct_codes,
    isolated_token_rows,
)
from hf_compress.packing import unpack_bits

TIED = {"llama", "gpt2", "whisper"}
CASES = [(a, assign, f) for a in ARCHS for assign in ("modulo", "context") for f in (2, 3)]


def _compress(arch: Arch, **kwargs: object) -> torch.nn.Module:
    plan = CompressionConfig(modules={EMBED[arch.name]: SubspaceEmbeddingConfig(**kwargs)})
    calib = [torch.randint(0, 24, (2, 16), generator=torch.Generator().manual_seed(1))]
    return hf_compress.compress(tiny_model(arch), plan, calibration=calib, progress=False)


@pytest.mark.parametrize(("arch", "assignment", "f"), CASES, ids=[f"{a.name}-{s}-f{f}" for a, s, f in CASES])
def test_compress_generate_save_reload_exact(arch: Arch, assignment: str, f: int, tmp_path: Path) -> None:
    model = _compress(arch, num_subspaces=f, assignment=assignment)
    emb = model.get_input_embeddings()
    assert isinstance(emb, SubspaceEmbedding) and emb.num_subspaces == f
    v, d = arch.make_config().vocab_size, emb.embedding_dim
    assert emb.num_rows ** f >= v > (emb.num_rows - 1) ** f
    assert sum(p.numel() for p in emb.parameters()) == emb.num_rows * d
    packed = (emb.all_codes() * torch.tensor([emb.num_rows ** k for k in range(f)])).sum(1)
    assert packed.unique().numel() == v  # every token has its own code
    if arch.name in TIED:
        head = model.get_output_embeddings()
        assert isinstance(head, TiedEmbeddingHead) and head.embedding is emb
    again, inputs, logits = run_save_reload(model, arch, tmp_path)
    emb2 = again.get_input_embeddings()
    assert type(emb2) is SubspaceEmbedding and torch.equal(emb2.all_codes(), emb.all_codes())
    assert torch.equal(_out(again, inputs), logits)
    if arch.generates:
        assert torch.equal(_generate(again, arch, inputs), _generate(model, arch, inputs))


def test_context_codes_are_stored_as_small_int_buffer(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = _compress(ARCHS[0], assignment="context")
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        codes = fh.get_tensor("model.embed_tokens.codes")
    emb = model.get_input_embeddings()
    assert emb.num_rows == 10  # 4 bits per index: 96 tokens x 2 indices -> 96 bytes, not 96 x 2 int16
    assert codes.dtype == torch.uint8 and codes.shape == (96,)
    assert torch.equal(unpack_bits(codes, 4, 192).view(96, 2), emb.all_codes())


def test_unpacked_code_layout_still_loads() -> None:
    packed = build_subspace(torch.randn(300, 8, generator=torch.Generator().manual_seed(0)),
                            SubspaceEmbeddingConfig(num_subspaces=2, assignment="context", num_rows=20))
    old = SubspaceEmbedding.from_spec({k: v for k, v in packed.spec().items() if k != "packed_codes"})
    assert not old.packed_codes and old.codes.shape == (300, 2) and old.codes.dtype == torch.uint8
    old.load_state_dict({"tables.0": packed.tables[0], "tables.1": packed.tables[1], "codes": packed.all_codes()})
    ids = torch.tensor([[0, 17, 299]])
    assert torch.equal(old(ids), packed(ids))
    modulo = _compress(ARCHS[0], assignment="modulo")
    assert "model.embed_tokens.codes" not in modulo.state_dict()  # computed, nothing stored


@pytest.mark.parametrize(("i", "n", "f", "want"), [(0, 10, 3, [0, 0, 0]), (7, 10, 3, [7, 0, 0]),
                                                   (123, 10, 3, [3, 2, 1]), (999, 10, 3, [9, 9, 9]),
                                                   (30521, 175, 2, [71, 174]), (2 ** 40 + 5, 2 ** 20, 3, [5, 0, 1])])
def test_modulo_mapping_is_exact(i: int, n: int, f: int, want: list[int]) -> None:
    assert modulo_codes(torch.tensor([i]), n, f)[0].tolist() == want


@pytest.mark.parametrize(("v", "n", "f"), [(49152, 491, 2), (49152, 491, 8), (30522, 305, 3), (2000, 50, 48)])
def test_modulo_codes_are_distinct_and_use_every_table(v: int, n: int, f: int) -> None:
    """Rows well above V^(1/f): the mixed radix would read row 0 of every table past the second for all tokens;
    the moduli n, n-1, ... spread the tokens over all tables with distinct codes."""
    layer = SubspaceEmbedding(v, f, num_rows=n, num_subspaces=f)
    assert layer.moduli == [n - k for k in range(f)]
    codes = layer.all_codes()
    assert torch.unique(codes, dim=0).shape[0] == v  # every token its own code
    assert [int(codes[:, k].unique().numel()) for k in range(f)] == layer.moduli  # all m_k rows of table k read
    again = SubspaceEmbedding.from_spec(layer.spec())
    assert again.moduli == layer.moduli and torch.equal(again.all_codes(), codes)


def test_modulo_without_recorded_moduli_keeps_the_mixed_radix() -> None:
    """A layer saved before moduli were recorded (no "moduli" in its spec) keeps c_k = ⌊v / n^k⌋ mod n; n too small
    for distinct moduli gives the mixed radix in the smallest base that covers V, so every table varies."""
    spec = {k: v for k, v in SubspaceEmbedding(49152, 8, num_rows=491, num_subspaces=2).spec().items()
            if k not in ("moduli", "radix")}
    old = SubspaceEmbedding.from_spec(spec)
    assert old.moduli is None and torch.equal(old.all_codes(), modulo_codes(torch.arange(49152), 491, 2))
    assert SubspaceEmbedding(100, 4, num_rows=10, num_subspaces=2).moduli is None
    small = SubspaceEmbedding(96, 4, num_rows=5, num_subspaces=4)  # lcm(5, 4, 3, 2) = 60 < 96: a mixed radix
    codes = small.all_codes()
    assert small.moduli is None and small.radix == 4  # base 5 would leave table 4 at row 0 (5^3 >= 96)
    assert torch.unique(codes, dim=0).shape[0] == 96 and all(codes[:, k].unique().numel() > 1 for k in range(4))
    assert SubspaceEmbedding.from_spec(small.spec()).radix == 4
    with pytest.warns(UserWarning, match=r"tables 3..3 give every token the same row.*subspaces \(<= 2\)"):
        SubspaceEmbedding(9, 3, num_rows=3, num_subspaces=3)  # base 3 covers 9 with 2 digits: the third is 0
    with pytest.raises(ValueError, match=r"moduli \[10, 5\] must be 2 ints in 1..10 whose lcm is >= the vocabulary"):
        SubspaceEmbedding(100, 4, num_rows=10, num_subspaces=2, moduli=[10, 5])


def test_lookup_concatenates_one_row_per_table() -> None:
    layer = SubspaceEmbedding(100, 7, num_rows=10, num_subspaces=2)
    assert layer.widths == [3, 4]  # the last slice takes the remainder
    torch.nn.init.normal_(layer.tables[0])
    torch.nn.init.normal_(layer.tables[1])
    out = layer(torch.tensor([[57]]))[0, 0]
    assert torch.equal(out, torch.cat([layer.tables[0][7], layer.tables[1][5]]))


def test_context_assignment_groups_similar_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(8, 4, generator=g) * 3, torch.randn(8, 4, generator=g) * 3
    perm = torch.randperm(64, generator=g)
    a, b = perm % 8, perm.div(8, rounding_mode="floor")  # the 64 (a, b) pairs, in scrambled token order
    weight = torch.cat([left[a], right[b]], 1) + 0.01 * torch.randn(64, 8, generator=g)
    context = build_subspace(weight, SubspaceEmbeddingConfig(num_subspaces=2, assignment="context", num_rows=8))
    codes = context.all_codes()
    same = (a[:, None] == a[None, :]) == (codes[:, 0][:, None] == codes[:, 0][None, :])
    assert same.all()  # tokens share a left row exactly when their left halves are alike
    err = (context.weight - weight).pow(2).sum() / weight.pow(2).sum()
    modulo = build_subspace(weight, SubspaceEmbeddingConfig(num_subspaces=2, assignment="modulo", num_rows=8))
    err_mod = (modulo.weight - weight).pow(2).sum() / weight.pow(2).sum()
    assert err < 1e-3 < 0.5 < err_mod


def test_distinct_codes_on_a_full_grid() -> None:
    weight = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    layer = build_subspace(weight, SubspaceEmbeddingConfig(num_subspaces=2, assignment="context"))
    assert layer.num_rows == 10
    codes = layer.all_codes()
    assert len({tuple(c) for c in codes.tolist()}) == 100


@pytest.mark.parametrize("f, n, vocab", [(16, 4, 3000), (13, 2, 8000)])
def test_distinct_codes_stay_bounded_for_many_subspaces(f: int, n: int, vocab: int) -> None:
    # m^f candidate cells would be 2^16 / 2^13 here: large f uses one-slice moves (and random free cells once
    # a 98%-full grid leaves none nearby) instead of the Cartesian product
    slices = list(torch.randn(vocab, f, generator=torch.Generator().manual_seed(1)).split(1, 1))
    tables = [torch.linspace(-1, 1, n)[:, None] for _ in range(f)]
    codes = distinct_codes(slices, tables, torch.ones(vocab))
    assert codes.shape == (vocab, f) and int(codes.min()) >= 0 and int(codes.max()) < n
    assert len({tuple(c) for c in codes.tolist()}) == vocab


def test_factored_head_matches_materialized_table() -> None:
    weight = torch.randn(50, 12, generator=torch.Generator().manual_seed(0))
    layer = build_subspace(weight, SubspaceEmbeddingConfig(num_subspaces=3, assignment="context"))
    h = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer.logits(h), h @ layer.weight.T)
    layer.factored_logits = False
    torch.testing.assert_close(layer.logits(h), h @ layer.weight.T)


def test_gemma_scaled_embedding_keeps_its_scale() -> None:
    cfg = transformers.Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        max_position_embeddings=32, sliding_window=8)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    plan = CompressionConfig(modules={"embed_tokens": SubspaceEmbeddingConfig(assignment="context")})
    hf_compress.compress(model, plan, progress=False)
    emb = model.get_input_embeddings()
    ids = torch.tensor([[3, 9, 41]])
    assert emb.embed_scale == pytest.approx(32 ** 0.5)
    torch.testing.assert_close(emb(ids)[0], emb.rows(ids[0]) * 32 ** 0.5)
    assert isinstance(model.get_output_embeddings(), TiedEmbeddingHead)
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_distillation_lowers_the_loss(name: str) -> None:
    arch = next(a for a in ARCHS if a.name == name)
    teacher = tiny_model(arch)
    student = _compress(arch, assignment="modulo")
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 96, (4, 16), generator=g) for _ in range(2)]
    frozen = {n: p.clone() for n, p in student.named_parameters() if "tables" not in n}
    result = distill(student, teacher, batches, steps=30, lr=1e-2, batch_size=4, progress=False)
    assert result["loss"] == ("both" if name in TIED else "hidden")
    assert result["loss_after"] < 0.9 * result["loss_before"]
    assert result["loss_after"] == pytest.approx(distillation_loss(student, teacher, batches, result["loss"]))
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)


def _bert_style_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer over ids 0..95 that wraps inputs as ``[CLS] … [SEP]`` (ids 1, 2; pad 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3} | {f"w{i}": i for i in range(4, 96)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1),
                                                                                               ("[SEP]", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", cls_token="[CLS]",
                                                sep_token="[SEP]")


def test_isolated_token_rows_use_the_tokenizer_template() -> None:
    prefix, suffix, ids = isolated_token_rows(_bert_style_tokenizer(), 96)
    assert (prefix, suffix) == ([1], [2])
    assert ids.tolist() == [3, *range(4, 96)]  # special ids 0, 1, 2 are never drawn


def test_isolated_token_distillation_reaches_tokens_the_text_never_shows() -> None:
    arch = next(a for a in ARCHS if a.name == "bert")
    teacher = tiny_model(arch)
    text = [torch.randint(3, 20, (4, 16), generator=torch.Generator().manual_seed(2))]  # ids 20..95 never occur
    unseen = torch.stack([torch.tensor([1, t, 2]) for t in range(20, 96)])
    losses = {}
    for k in (0, 32):
        student = _compress(arch, assignment="modulo")
        before = distillation_loss(student, teacher, [unseen])
        result = distill(student, teacher, text, steps=40, lr=1e-2, batch_size=4, progress=False, isolated_tokens=k,
                         tokenizer=_bert_style_tokenizer())
        assert result["isolated_tokens"] == k
        losses[k] = distillation_loss(student, teacher, [unseen]) / before
    assert losses[32] < 0.8 * losses[0]
    with pytest.raises(ValueError, match="needs tokenizer"):
        distill(_compress(arch, assignment="modulo"), teacher, text, steps=1, isolated_tokens=4, progress=False)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_subspaces": 0}, r"num_subspaces \(f\) must be an int >= 1"),
    ({"num_subspaces": 2, "num_rows": 9}, r"9\^2 = 81 < vocabulary size 96.*num_rows >= 10"),
    ({"num_subspaces": 5, "uneven_widths": "error"}, r"does not divide the embedding dimension 48"),
    ({"num_subspaces": 49, "num_rows": 2}, r"exceeds the embedding dimension 48"),
    ({"assignment": "random"}, r"assignment must be one of"),
    ({"num_rows": 10, "param_fraction": 0.1}, r"num_rows or param_fraction, not both"),
    ({"param_fraction": 1.5}, r"param_fraction must be in \(0, 1\]"),
])
def test_bad_configs_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _compress(ARCHS[2], **kwargs)  # bert: V = 96, d = 48


def test_non_embedding_target_and_json_round_trip() -> None:
    with pytest.raises(TypeError, match=r"compresses nn\.Embedding token tables only"):
        hf_compress.compress(tiny_model(ARCHS[0]), CompressionConfig(modules={"q_proj": SubspaceEmbeddingConfig()}),
                             progress=False)
    plan = CompressionConfig(modules={"wte": SubspaceEmbeddingConfig(num_subspaces=3, assignment="context")})
    again = CompressionConfig.from_json(plan.to_json())
    assert again.modules["wte"] == plan.modules["wte"]
    assert "subspace_embedding" in hf_compress.available_methods()
    assert hf_compress.SubspaceEmbeddingConfig is SubspaceEmbeddingConfig


def test_keep_rows_turns_modulo_codes_explicit() -> None:
    layer = SubspaceEmbedding(100, 8, num_rows=10, num_subspaces=2)
    torch.nn.init.normal_(layer.tables[0])
    torch.nn.init.normal_(layer.tables[1])
    keep = torch.tensor([57, 3, 99])
    before = layer(keep)
    layer.keep_rows(keep)
    assert layer.assignment == "context" and layer.num_embeddings == 3 and layer.codes.dtype == torch.uint8
    assert torch.equal(layer(torch.arange(3)), before)
    assert SubspaceEmbedding.from_spec(layer.spec()).spec() == layer.spec()
