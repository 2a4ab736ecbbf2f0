"""PEFT LoRA on compressed token tables and linears (``hf_compress.lora``), table-driven over formats and
architectures."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from conftest import ARCHS, EMBED, Arch, model_output, tiny_model

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig, LowRankLinear
from hf_compress.layers.tt_embedding import CompressedEmbedding
from hf_compress.lora import LoraCompressedEmbedding, LoraCompressedLinear, register_compressed_lora
from hf_compress.methods.jlcm import CodebookConfig
from hf_compress.methods.subspace import SubspaceEmbeddingConfig
from hf_compress.methods.tt_embedding import TTEmbeddingConfig, build_embedding

TABLES = {
    "tt_per_token": lambda: TTEmbeddingConfig(format="per_token"),
    "tt_adaptive": lambda: TTEmbeddingConfig(),
    "tt_matrix": lambda: TTEmbeddingConfig(format="tt_matrix"),
    "subspace": lambda: SubspaceEmbeddingConfig(num_subspaces=2),
    "codebook": lambda: CodebookConfig(bits=4, method="kmeans"),
}
# every table format on Llama; the default (adaptive) table on the other architectures
CASES = [(ARCHS[0], t) for t in TABLES] + [(a, "tt_adaptive") for a in ARCHS[1:]]


def _train(model: torch.nn.Module, arch: Arch, steps: int = 3) -> None:
    """A few AdamW steps on the model's own loss (causal LM / Whisper) or the hidden states' mean square (BERT)."""
    inputs = arch.inputs()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        if arch.name == "bert":
            loss = model(**inputs).last_hidden_state.pow(2).mean()
        else:
            labels = inputs["decoder_input_ids"] if arch.name == "whisper" else inputs["input_ids"]
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize(("arch", "table"), CASES, ids=[f"{a.name}-{t}" for a, t in CASES])
def test_lora_on_a_compressed_table_trains_saves_and_reloads(arch: Arch, table: str, tmp_path: Path) -> None:
    model = hf_compress.compress(tiny_model(arch), CompressionConfig(modules={EMBED[arch.name]: TABLES[table]()}),
                                 progress=False)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    inputs = arch.inputs()
    before = model_output(model, inputs)
    frozen = {n: p.detach().clone() for n, p in model.get_input_embeddings().named_parameters()}

    target = "embed_tokens" if arch.name == "whisper" else EMBED[arch.name]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target]))  # as if dense
    wrapped = pm.get_base_model().get_input_embeddings()
    assert isinstance(wrapped, LoraCompressedEmbedding)
    assert isinstance(wrapped.get_base_layer(), CompressedEmbedding)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_embedding_" in n for n in trainable), trainable
    assert torch.equal(model_output(pm, inputs), before)  # PEFT's init: A = 0, so the adapter starts as a no-op

    _train(pm, arch)
    tuned = model_output(pm, inputs)
    assert not torch.allclose(tuned, before)
    for n, p in wrapped.get_base_layer().named_parameters():  # the compressed factors did not move
        assert torch.equal(p, frozen[n]), n
    pm.save_pretrained(tmp_path / "adapter")

    base = arch.compressed_auto.from_pretrained(base_dir)
    config = register_compressed_lora(peft.LoraConfig.from_pretrained(tmp_path / "adapter"))  # explicit: the same
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", config=config).eval()
    assert torch.equal(model_output(loaded, inputs), tuned)
    with pytest.raises(ValueError, match="cannot be merged"):
        loaded.merge_and_unload()


LINEARS = {
    "low_rank": lambda: LowRankConfig(rank=4),
    "tucker": lambda: LowRankConfig(method="tucker", rank_ratio=0.5),
    "codebook": lambda: CodebookConfig(bits=3, method="kmeans"),
}
# every compressed linear on Llama; low rank on the other architectures
LINEAR_CASES = [(ARCHS[0], k) for k in LINEARS] + [(a, "low_rank") for a in ARCHS[1:]]


@pytest.mark.parametrize(("arch", "kind"), LINEAR_CASES, ids=[f"{a.name}-{k}" for a, k in LINEAR_CASES])
def test_default_lora_targets_on_compressed_attention(arch: Arch, kind: str, tmp_path: Path) -> None:
    """PEFT's default targets (q_proj/v_proj, c_attn, query/value) are compressed modules once attention is
    compressed: a plain LoraConfig puts an adapter beside each (QLoRA-style) since import hf_compress installs the
    mapping, and every loading path (PeftModel, the model's own load_adapter) finds it again."""
    model = hf_compress.compress(tiny_model(arch), CompressionConfig(modules={arch.attn_pattern: LINEARS[kind]()}),
                                 progress=False)
    model.save_pretrained(tmp_path / "base")
    inputs = arch.inputs()
    before = model_output(model, inputs)
    targets = ["q_proj", "v_proj"] if arch.name == "whisper" else None  # PEFT has no default for Whisper
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    wrapped = [m for m in pm.modules() if isinstance(m, LoraCompressedLinear)]
    assert wrapped and all(m.in_features == m.get_base_layer().in_features for m in wrapped)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable), trainable
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in wrapped)  # not the fp16 codebooks' dtype
    assert torch.equal(model_output(pm, inputs), before)  # B = 0 at init: the adapter starts as a no-op
    _train(pm, arch)
    tuned = model_output(pm, inputs)
    assert not torch.allclose(tuned, before)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(arch.compressed_auto.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    assert torch.equal(model_output(loaded, inputs), tuned)
    own = arch.compressed_auto.from_pretrained(tmp_path / "base")
    own.load_adapter(str(tmp_path / "adapter"))  # transformers' PEFT integration
    assert torch.equal(model_output(own.eval(), inputs), tuned)
    with pytest.raises(ValueError, match="cannot be merged"):
        loaded.merge_and_unload()


def test_peft_dispatch_is_installed_once_and_keeps_a_users_own_mapping() -> None:
    """enable_peft_dispatch wraps PEFT's module factory once; a config that already maps a compressed type to the
    user's own LoRA layer keeps it, and the other compressed types are added beside it."""
    from peft.tuners.lora.model import LoraModel

    from hf_compress.lora import enable_peft_dispatch

    factory = LoraModel.__dict__["_create_new_module"]
    assert enable_peft_dispatch() and LoraModel.__dict__["_create_new_module"] is factory  # idempotent

    class MyLora(LoraCompressedLinear):
        pass

    model = hf_compress.compress(tiny_model(ARCHS[0]), CompressionConfig(
        modules={"q_proj": LowRankConfig(rank=2), "v_proj": CodebookConfig(bits=3, method="kmeans")}), progress=False)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    config._register_custom_module({LowRankLinear: MyLora})
    pm = peft.get_peft_model(model, config)
    layer = pm.base_model.model.model.layers[0].self_attn
    assert type(layer.q_proj) is MyLora and type(layer.v_proj) is LoraCompressedLinear


def test_a_refused_merge_merges_nothing() -> None:
    """merge_and_unload refuses up front: a dense layer's adapter met before the compressed one stays unmerged."""
    model = hf_compress.compress(tiny_model(ARCHS[0]), CompressionConfig(
        modules={r"layers\.1\.self_attn\.q_proj$": LowRankConfig(rank=2)}), progress=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"],
                                                    init_lora_weights=False)).eval()
    inputs = ARCHS[0].inputs()
    before = model_output(pm, inputs)
    for merge in (pm.merge_and_unload, pm.merge_adapter):
        with pytest.raises(ValueError, match="nothing was merged"):
            merge()
    assert not any(getattr(m, "merged", False) for m in pm.modules())
    assert torch.equal(model_output(pm, inputs), before)
    model = hf_compress.compress(tiny_model(ARCHS[0]), CompressionConfig(  # PEFT's mixed models too
        modules={r"layers\.1\.self_attn\.q_proj$": LowRankConfig(rank=2)}), progress=False)
    mixed = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                                mixed=True).eval()
    before = model_output(mixed, inputs)
    with pytest.raises(ValueError, match="nothing was merged"):
        mixed.merge_and_unload()
    assert torch.equal(model_output(mixed, inputs), before)


def test_merging_only_dense_adapters_is_allowed() -> None:
    """A merge refuses only adapters that sit on compressed layers: merging a dense-only adapter, or merging after
    the compressed layers' adapter was deleted, works as in PEFT."""
    plan = CompressionConfig(modules={r"layers\.0\.self_attn\.q_proj$": LowRankConfig(rank=2)})
    inputs = ARCHS[0].inputs()
    for drop_compressed in (False, True):
        model = hf_compress.compress(tiny_model(ARCHS[0]), plan, progress=False)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False),
                                 adapter_name="dense")
        pm.add_adapter("comp", peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0]))
        with pytest.raises(ValueError, match="nothing was merged"):
            pm.merge_and_unload(adapter_names=["dense", "comp"])
        with pytest.raises(TypeError, match="list of strings"):  # not read letter by letter (and passed)
            pm.merge_and_unload(adapter_names="comp")
        pm.eval()
        want = model_output(pm, inputs)  # the active adapter: "dense"
        if drop_compressed:
            pm.delete_adapter("comp")
        merged = pm.merge_and_unload(**({} if drop_compressed else {"adapter_names": ["dense"]}))
        assert isinstance(merged.model.layers[0].self_attn.q_proj, LowRankLinear)
        assert torch.allclose(model_output(merged, inputs), want, atol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "down"], ["model.layers.0.self_attn.q_proj",
                                                          "model.layers.0.self_attn.q_proj.down"],
                                     r".*layers\.0\.self_attn\.q_proj(\.down)?"])
def test_lora_inside_lora_is_refused(targets: list[str] | str) -> None:
    """An adapter on a compressed layer and on its factors (one config, by name, full name or regex; or a second
    adapter over factors that already carry one) would nest LoRA inside LoRA, which does not reload."""
    plan = CompressionConfig(modules={r"layers\.0\.self_attn\.q_proj$": LowRankConfig(rank=2)})
    model = hf_compress.compress(tiny_model(ARCHS[0]), plan, progress=False)
    with pytest.raises(ValueError, match=r"names both the compressed LowRankLinear .*q_proj and its factors"):
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
    model = hf_compress.compress(tiny_model(ARCHS[0]), plan, progress=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["down", "up"]), adapter_name="factors")
    with pytest.raises(ValueError, match="already carry LoRA adapters"):
        pm.add_adapter("outer", peft.LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("kind", sorted(LINEARS))
def test_linear_adapters_take_the_model_dtype_and_refuse_weight_rewriting_inits(kind: str) -> None:
    model = _compressed_attention(kind).to(torch.bfloat16)  # a bias-free CodebookLinear: only fp16 storage
    pm = peft.get_peft_model(model, register_compressed_lora(peft.LoraConfig(r=4)), autocast_adapter_dtype=False)
    wrapped = [m for m in pm.modules() if isinstance(m, LoraCompressedLinear)]
    assert wrapped and {m.lora_A["default"].weight.dtype for m in wrapped} == {torch.bfloat16}
    for init in ("pissa", "olora"):  # they write W - BA into the base weight, which is not stored densely
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}' rewrites the base weight"):
            config = register_compressed_lora(peft.LoraConfig(r=4, init_lora_weights=init))
            peft.get_peft_model(_compressed_attention(kind), config)


def test_codebook_adapters_on_a_model_compressed_in_bf16_take_bf16() -> None:
    """The layer's dtype anchor comes from the weight it replaced, not only from later ``.to()`` casts."""
    plan = CompressionConfig(modules={ARCHS[0].attn_pattern: LINEARS["codebook"]()})
    model = hf_compress.compress(tiny_model(ARCHS[0]).to(torch.bfloat16), plan, progress=False)
    pm = peft.get_peft_model(model, register_compressed_lora(peft.LoraConfig(r=4)), autocast_adapter_dtype=False)
    wrapped = [m for m in pm.modules() if isinstance(m, LoraCompressedLinear)]
    assert wrapped and {m.lora_A["default"].weight.dtype for m in wrapped} == {torch.bfloat16}


def _compressed_attention(kind: str) -> torch.nn.Module:
    return hf_compress.compress(tiny_model(ARCHS[0]), CompressionConfig(modules={ARCHS[0].attn_pattern:
                                                                                 LINEARS[kind]()}), progress=False)


def test_the_adapter_adds_scaled_lora_rows_times_embed_scale() -> None:
    torch.manual_seed(0)
    table = build_embedding(torch.randn(40, 12), TTEmbeddingConfig(format="per_token", shape=[3, 4], ranks=[2]),
                            embed_scale=3.0, padding_idx=1)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = table

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids)

    pm = peft.get_peft_model(Holder(), register_compressed_lora(peft.LoraConfig(r=3, lora_alpha=6,
                                                                                target_modules=["emb"])))
    layer = pm.base_model.model.emb
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]  # [r, V], [d, r]
    ids = torch.tensor([[0, 1, 5], [39, 2, 1]])
    expected = table(ids) + 3.0 * (6 / 3) * (a.T[ids] @ b.T)
    assert torch.allclose(pm(ids), expected, atol=1e-5)
    out = pm(ids).sum()
    out.backward()
    assert a.grad[:, 1].abs().sum() == 0  # padding_idx rows get no LoRA gradient, as in PEFT's dense Embedding
    assert a.grad[:, 0].abs().sum() > 0


def test_register_compressed_lora_rejects_other_configs() -> None:
    with pytest.raises(TypeError, match=r"peft\.LoraConfig"):
        register_compressed_lora({"r": 4})


def test_modules_to_save_trains_the_compressed_table_itself(tmp_path: Path) -> None:
    arch = ARCHS[0]
    model = hf_compress.compress(tiny_model(arch), CompressionConfig(modules={"embed_tokens": TTEmbeddingConfig()}),
                                 progress=False)
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    _train(pm, arch)
    tuned = model_output(pm, arch.inputs())
    pm.save_pretrained(tmp_path / "adapter")
    base = arch.compressed_auto.from_pretrained(tmp_path / "base")
    assert not torch.allclose(model_output(base, arch.inputs()), tuned)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.equal(model_output(loaded, arch.inputs()), tuned)


def test_dora_is_refused_and_codebook_adapters_use_the_model_dtype() -> None:
    def table(kind: str) -> torch.nn.Module:
        plan = CompressionConfig(modules={"embed_tokens": TABLES[kind]()})
        return hf_compress.compress(tiny_model(ARCHS[0]), plan, progress=False)

    model = table("tt_adaptive")
    with pytest.raises(ValueError, match="DoRA on the compressed AdaptiveRankEmbedding"):
        peft.get_peft_model(model, register_compressed_lora(peft.LoraConfig(r=4, use_dora=True,
                                                                            target_modules=["embed_tokens"])))
    model = table("codebook")  # an fp32 model; the table's codebooks are fp16 storage
    pm = peft.get_peft_model(model, register_compressed_lora(peft.LoraConfig(r=4, target_modules=["embed_tokens"])),
                             autocast_adapter_dtype=False)
    layer = pm.get_base_model().get_input_embeddings()
    assert layer.lora_embedding_A["default"].dtype == layer.lora_embedding_B["default"].dtype == torch.float32


def test_codebook_storage_made_trainable_by_peft_trains_in_fp32() -> None:
    """``modules_to_save`` on a codebook table turns on its fp16 storage's gradients; the first training forward
    promotes it to fp32 (Adam's small steps vanished in fp16) in the same parameter objects the optimizer holds."""
    arch = ARCHS[0]
    model = hf_compress.compress(tiny_model(arch), CompressionConfig(modules={"embed_tokens": TABLES["codebook"]()}),
                                 progress=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    storage = [p for n, p in pm.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert storage and all(p.dtype == torch.float16 for p in storage)
    before = [p.detach().clone() for p in storage]
    opt = torch.optim.AdamW(storage, lr=1e-4)
    pm.train()
    for _ in range(3):
        pm(**arch.inputs(), labels=arch.inputs()["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == torch.float32 for p in storage)
    assert all((p.detach() - b.float()).abs().max() > 1e-5 for p, b in zip(storage, before, strict=True))


def test_a_copy_of_the_tied_head_alone_reads_the_models_table_and_a_model_copy_its_own() -> None:
    import copy

    arch = ARCHS[0]
    model = hf_compress.compress(tiny_model(arch), CompressionConfig(modules={"embed_tokens": TTEmbeddingConfig()}),
                                 progress=False)
    assert copy.deepcopy(model.lm_head).embedding is model.model.embed_tokens  # (PEFT modules_to_save copies it)
    twin = copy.deepcopy(model)
    assert twin.lm_head.embedding is twin.model.embed_tokens is not model.model.embed_tokens

    class HeadFirst(torch.nn.Module):  # a wrapper that registers the head before the model: copied first
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.head, self.inner = inner.lm_head, inner

    wrapped = copy.deepcopy(HeadFirst(model))
    assert wrapped.head.embedding is wrapped.inner.model.embed_tokens is not model.model.embed_tokens


@pytest.mark.parametrize("table", ["tt_adaptive", "low_rank"])
def test_compressing_a_frozen_model_keeps_it_frozen(table: str) -> None:
    arch = ARCHS[0]
    model = tiny_model(arch).requires_grad_(False)
    plan = {"embed_tokens": TTEmbeddingConfig()} if table == "tt_adaptive" else {"q_proj": LowRankConfig(rank=4)}
    hf_compress.compress(model, CompressionConfig(modules=plan), progress=False)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    unfrozen = hf_compress.compress(tiny_model(arch), CompressionConfig(modules=plan), progress=False)
    assert any(p.requires_grad for p in unfrozen.parameters())  # a trainable module stays trainable


def test_codebooks_and_lora_adapters_train_together() -> None:
    """mark_codebooks_trainable on a PeftModel leaves the LoRA adapters trainable (it froze them)."""
    from hf_compress.methods.jlcm import mark_codebooks_trainable

    model = hf_compress.compress(tiny_model(ARCHS[0]), CompressionConfig(
        modules={"v_proj": CodebookConfig(bits=3, method="kmeans")}), progress=False)
    model.model.lora_gate = torch.nn.Linear(4, 4)  # a user's module named like an adapter: frozen as any other
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"]))
    names = mark_codebooks_trainable(pm, biases=False)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable) and any(n.endswith("codebooks") for n in trainable)
    assert any("modules_to_save.default" in n for n in trainable)  # PEFT's trainable head copy stays trainable
    assert not any(".lora_A." in n or "modules_to_save" in n for n in names)  # kept, not touched
    assert not any("lora_gate" in n for n in trainable)
