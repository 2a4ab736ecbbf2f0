"""What users pass in: calibration in every common form, tied heads as targets, vocabulary edits that must not
half-apply, failed distillation, bad TT shapes and sweep budgets. Each case failed or misbehaved before."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import ARCHS, calibration_batches, model_output, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig, TTEmbeddingConfig, vocab
from hf_compress.methods.jlcm import CodebookConfig
from hf_compress.methods.subspace import SubspaceEmbeddingConfig, distill
from hf_compress.sweep import perplexity_fn

LLAMA = ARCHS[0]
WHITENED = CompressionConfig(modules={LLAMA.mlp_pattern: LowRankConfig(method="whitened", rank_ratio=0.5)})


def _whitened_logits(calibration: Any) -> torch.Tensor:
    model = hf_compress.compress(tiny_model(LLAMA), WHITENED, calibration=calibration, progress=False)
    return model_output(model, LLAMA.inputs())


CALIBRATION_FORMS = {
    "batch_encodings": lambda ids: [transformers.BatchEncoding({"input_ids": ids})],
    "one_tensor": lambda ids: ids,
    "one_dict": lambda ids: {"input_ids": ids},
    "rows_1d": lambda ids: list(ids),
}


@pytest.mark.parametrize("form", list(CALIBRATION_FORMS))
def test_calibration_forms_give_the_same_compression(form: str) -> None:
    ids = torch.cat(calibration_batches(LLAMA))  # [4, 8]
    reference = _whitened_logits([ids])
    assert torch.equal(_whitened_logits(CALIBRATION_FORMS[form](ids)), reference)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in ("llama", "bert")], ids=lambda a: a.name)
def test_padded_calibration_batches_give_the_unpadded_statistics(arch: Any) -> None:
    """A tokenizer's padded batch (``attention_mask`` 0 on pads) must give the same input statistics as the
    unpadded sequences: pad positions are not calibration tokens."""
    from hf_compress.calibration import input_covariances, input_statistics_streamed

    model = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    long, short = torch.randint(3, 90, (1, 12), generator=g), torch.randint(3, 90, (1, 5), generator=g)
    ids = torch.cat([long, torch.cat([short, torch.zeros(1, 7, dtype=torch.long)], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.ones(1, 5), torch.zeros(1, 7)], 1)]).long()
    padded = [{"input_ids": ids, "attention_mask": mask}]
    plain = [{"input_ids": long}, {"input_ids": short}]
    names = [n for n, _ in model.named_modules() if re.search(arch.attn_pattern, n)][:2]
    for stats in (lambda b: input_covariances(model, names, b),
                  lambda b: next(input_statistics_streamed(model, names, b))[0]):
        got, want = stats(padded), stats(plain)
        for n in names:
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-8)


def test_a_bad_module_name_leaves_no_calibration_hook() -> None:
    from hf_compress.calibration import input_covariances

    model = tiny_model(LLAMA)
    with pytest.raises(AttributeError):
        input_covariances(model, ["model.layers.0.self_attn.q_proj", "model.layers.0.nope"], calibration_batches(LLAMA))
    assert not model.model.layers[0].self_attn.q_proj._forward_pre_hooks


def test_calibration_of_another_type_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="calibration batch 0 is a str"):
        hf_compress.compress(tiny_model(LLAMA), WHITENED, calibration=["some text"], progress=False)


def test_perplexity_fn_counts_every_row_of_a_batch() -> None:
    model, batches = tiny_model(LLAMA), calibration_batches(LLAMA)  # [2, 8] each
    rows = [r[None] for b in batches for r in b]
    assert perplexity_fn(batches)(model) == pytest.approx(perplexity_fn(rows)(model), rel=1e-5)


def test_sweep_without_budget_says_what_to_pass_and_keeps_train_mode() -> None:
    model = tiny_model(LLAMA).train()
    with pytest.raises(ValueError, match="pass budget="):
        hf_compress.sweep(model, [LLAMA.attn_pattern], [0.5], eval_fn=lambda m: 0.0)
    assert model.training

    def failing(m: torch.nn.Module) -> float:
        assert not m.training  # the search evaluates in eval mode
        raise RuntimeError("eval failed")

    for search in (lambda: hf_compress.sweep(model, [LLAMA.attn_pattern], [0.5], eval_fn=failing, budget=0.9),
                   lambda: hf_compress.plan(model, 0.9, eval_fn=failing)):
        with pytest.raises(RuntimeError, match="eval failed"):
            search()
        assert model.training  # restored although the search failed


@pytest.mark.parametrize("cfg", [LowRankConfig(rank=8), CodebookConfig(bits=4, method="kmeans")],
                         ids=["low_rank", "codebook"])
def test_compressing_a_tied_head_unties_it_and_reloads(cfg: Any, tmp_path: Path) -> None:
    model = tiny_model(LLAMA)
    table = model.model.embed_tokens.weight.detach().clone()
    hf_compress.compress(model, CompressionConfig(modules={"lm_head": cfg}), progress=False)
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path)
    again = LLAMA.auto_class.from_pretrained(tmp_path)
    assert torch.equal(again.model.embed_tokens.weight, table)
    assert torch.equal(model_output(again, LLAMA.inputs()), model_output(model, LLAMA.inputs()))


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def _with_embedding(cfg: Any) -> torch.nn.Module:
    return hf_compress.compress(tiny_model(LLAMA), CompressionConfig(modules={"embed_tokens": cfg}), progress=False)


def test_add_tokens_skips_known_tokens_and_rejects_duplicates_unchanged() -> None:
    model, tok = _with_embedding(TTEmbeddingConfig(compression=1.5, metric="identity")), _tokenizer()
    table = model.model.embed_tokens.weight.detach().clone()
    assert vocab.add_tokens(model, tok, ["w5", "brand_new"]) == [5, 96]
    assert torch.equal(model.model.embed_tokens.weight[:96], table)  # w5's trained row kept
    with pytest.raises(ValueError, match="duplicates"):
        vocab.add_tokens(model, tok, ["x", "x"])
    assert len(tok) == model.model.embed_tokens.num_embeddings == 97


def test_add_tokens_to_a_table_that_cannot_grow_changes_nothing() -> None:
    model, tok = _with_embedding(SubspaceEmbeddingConfig()), _tokenizer()
    with pytest.raises(NotImplementedError, match="nothing was changed"):
        vocab.add_tokens(model, tok, ["brand_new"])
    assert len(tok) == 96


class _FailingTeacher(torch.nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("teacher failed")


def test_failed_distillation_restores_the_trainable_flags() -> None:
    student = _with_embedding(SubspaceEmbeddingConfig())
    flags = [p.requires_grad for p in student.parameters()]
    with pytest.raises(RuntimeError, match="teacher failed"):  # fails once only the tables are trainable
        distill(student, _FailingTeacher(), calibration_batches(LLAMA), steps=1, progress=False)
    assert [p.requires_grad for p in student.parameters()] == flags


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"format": "tt_matrix", "vocab_shape": [4, 4, 4]}, r"model\.embed_tokens: vocab_shape .* product covers V = 96"),
    ({"format": "tt_matrix", "vocab_shape": [96]}, r"model\.embed_tokens: vocab_shape \[96\] must have 3 factors"),
    ({"min_rank": 128}, r"model\.embed_tokens: min_rank 128 exceeds min\(V, d\) = 64"),
])
def test_bad_tt_shapes_name_the_module_and_the_fix(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _with_embedding(TTEmbeddingConfig(metric="identity", **kwargs))


def test_submodules_named_in_the_readme_resolve_after_import() -> None:
    code = "import hf_compress; hf_compress.vocab.add_tokens; hf_compress.healing.distill_logits; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.stdout.strip() == "ok", proc.stderr[-1000:]


def test_resize_token_embeddings_on_a_compressed_table_names_the_vocab_tools() -> None:
    model = _with_embedding(TTEmbeddingConfig(compression=1.5, metric="identity"))
    with pytest.raises(TypeError, match=r"hf_compress\.vocab\.add_tokens"):
        model.resize_token_embeddings(100)
    table = model.get_input_embeddings()  # calls that change nothing answer as transformers does: the table
    v = table.num_embeddings
    assert model.resize_token_embeddings() is table and model.resize_token_embeddings(v) is table
    assert model.resize_token_embeddings(v - 1, pad_to_multiple_of=v) is table
    with pytest.raises(TypeError, match=r"hf_compress\.vocab\.add_tokens"):
        model.resize_token_embeddings(v, pad_to_multiple_of=v + 1)
    dense_table = hf_compress.compress(tiny_model(LLAMA), WHITENED, calibration=calibration_batches(LLAMA),
                                       progress=False)
    assert dense_table.resize_token_embeddings(100).num_embeddings == 100  # a dense table resizes as usual
    from hf_compress.methods.jlcm import CodebookConfig
    from hf_compress.methods.subspace import SubspaceEmbeddingConfig

    # only what the table supports: a subspace table can be pruned, not grown; a codebook table neither
    subspace = _with_embedding(SubspaceEmbeddingConfig(num_subspaces=2))
    with pytest.raises(TypeError, match=r"SubspaceEmbedding; resize it with hf_compress\.vocab\.keep_tokens") as err:
        subspace.resize_token_embeddings(100)
    assert "add_tokens" not in str(err.value)
    with pytest.raises(TypeError, match=r"CodebookEmbedding; it cannot be resized: resize the dense model first"):
        _with_embedding(CodebookConfig(bits=4, method="kmeans")).resize_token_embeddings(100)


def test_a_task_class_skips_another_task_head_of_the_checkpoint(tmp_path: Path) -> None:
    plan = CompressionConfig(modules={r"^lm_head$": LowRankConfig(rank=8), r"mlp\.up_proj$": LowRankConfig(rank=8)})
    model = hf_compress.compress(tiny_model(LLAMA), plan, progress=False)
    model.save_pretrained(tmp_path)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)  # raised on 'lm_head'
    ids = LLAMA.inputs()["input_ids"]
    with torch.no_grad():
        assert torch.equal(classifier.model(ids).last_hidden_state, model.model(ids).last_hidden_state)


def test_a_compressed_tied_table_of_a_base_checkpoint_is_a_clear_error_in_a_task_class(tmp_path: Path) -> None:
    bert = next(a for a in ARCHS if a.name == "bert")
    base = hf_compress.compress(tiny_model(bert), CompressionConfig(modules={"word_embeddings": TTEmbeddingConfig(
        compression=1.5, metric="identity")}), progress=False)
    base.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved from a base model"):  # was an AttributeError inside weight tying
        transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)


def test_add_tokens_into_a_padded_table_that_cannot_overwrite_changes_nothing() -> None:
    model = _with_embedding(TTEmbeddingConfig(format="tt_matrix", compression=1.5))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(90)}, unk_token="w0"))  # the table has 96 rows
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    with pytest.raises(NotImplementedError, match="overwriting tokens; nothing was changed"):
        vocab.add_tokens(model, tokenizer, ["brand_new"])
    assert len(tokenizer) == 90


def test_compressing_the_linears_never_materializes_a_compressed_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_compress.layers.tt_embedding import CompressedEmbedding

    reads: list[int] = []
    table = CompressedEmbedding.weight
    monkeypatch.setattr(CompressedEmbedding, "weight", property(lambda self: reads.append(1) or table.fget(self)))
    plan = CompressionConfig(modules={"embed_tokens": TTEmbeddingConfig(compression=1.5, metric="identity"),
                                      r"(self_attn|mlp)\.\w+_proj$": LowRankConfig(rank_ratio=0.5)})
    hf_compress.compress(tiny_model(LLAMA), plan, progress=False)
    assert reads == []  # the tied-head check read the whole table once per linear target


def test_perplexity_with_a_last_window_of_one_token() -> None:
    """Stride = window and no BOS: a text of 2·window + 1 tokens ends in a one-token window with nothing to score
    (it crashed); each window's first token is context only, as documented."""
    from test_vocab import _bpe

    from hf_compress.evaluation import perplexity

    model = tiny_model(LLAMA)
    out = perplexity(model, _bpe(), "the cat sat on the mat and the dog ate the hat " * 4, max_tokens=17, window=8,
                     stride=8)
    assert out["text_tokens"] == 17 and out["tokens"] == 14 and out["windows"] == 3 and math.isfinite(out["ppl"])


@pytest.mark.parametrize(("make", "field", "want"), [
    (lambda: LowRankConfig(method="whitened", rank_ratio=0.5, damping=math.nan), "damping", "float"),  # spun forever
    (lambda: TTEmbeddingConfig(format="per_token", order=2.5), "order", "int"),  # spun forever
    (lambda: LowRankConfig(rank=True), "rank", "int or None"),
    (lambda: LowRankConfig(rank_ratio="0.5"), "rank_ratio", "float or None"),
    (lambda: LowRankConfig(method="tucker", tucker_ranks=[2.5, 2, 2]), "tucker_ranks", r"list\[int\] or None"),
    (lambda: CodebookConfig(bits_per_weight=math.inf), "bits_per_weight", "float or None"),
    (lambda: CodebookConfig(bits=3, steps=2.5), "steps", "int"),
    (lambda: SubspaceEmbeddingConfig(num_subspaces=2, frequency_smoothing=math.nan), "frequency_smoothing", "float"),
    (lambda: hf_compress.ProductTwinConfig(rank=4, whiten="no"), "whiten", "bool"),
])
def test_config_fields_of_the_wrong_type_are_refused_up_front(make: Any, field: str, want: str) -> None:
    with pytest.raises(TypeError, match=rf"Config\.{field} must be {want} \(numbers finite\), got"):
        make()


@pytest.mark.parametrize(("plan", "message"), [
    ({"modules": []}, "a compression plan is a JSON object"),
    ([], "a compression plan is a JSON object"),
    ({"modules": {"q_proj": "low_rank"}}, "a method config is a JSON object"),
    ({"modules": {}, "skip_modules": "k_proj"}, "skip_modules must be a list of module-name patterns"),  # was split
    ({"modules": {}, "version": "1"}, "version must be an int"),
])
def test_malformed_plans_are_clear_errors(plan: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        CompressionConfig.from_dict(plan)


def test_a_failed_compress_leaves_the_model_as_it_was_or_recorded_as_it_is(tmp_path: Path) -> None:
    model = tiny_model(LLAMA)
    cls, cfg = type(model), model.config
    with pytest.raises(ValueError):  # fails on the first target: nothing replaced
        hf_compress.compress(model, CompressionConfig(modules={"q_proj": LowRankConfig(rank=1000)}), progress=False)
    assert type(model) is cls and model.config is cfg and model.model.layers[0].self_attn.config is cfg
    assert not isinstance(model.model.layers[0].self_attn.q_proj, hf_compress.LowRankLinear)
    # q_proj fits rank 16, k_proj ([32, 64]) does not take rank 40: q_proj of layer 0 is replaced before the error
    plan = CompressionConfig(modules={"q_proj": LowRankConfig(rank=16), "k_proj": LowRankConfig(rank=40)})
    with pytest.raises(ValueError) as err:
        hf_compress.compress(model, plan, progress=False)
    assert "stopped at model.layers.0.self_attn.k_proj; 1 module(s) before it are already compressed" in \
        "".join(getattr(err.value, "__notes__", []))
    assert list(model.config.compression_config["layers"]) == ["model.layers.0.self_attn.q_proj"]
    model.save_pretrained(tmp_path)  # partly compressed, but consistent: it reloads exactly
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(model_output(again, LLAMA.inputs()), model_output(model, LLAMA.inputs()))


@pytest.mark.parametrize(("batch", "message"), [
    (torch.rand(1, 8), r"calibration batch 0 must be a non-empty integer \[batch, seq\] tensor"),
    (torch.zeros(1, 2, 8, dtype=torch.long), r"calibration batch 0 must be a non-empty integer"),
    (torch.zeros(1, 0, dtype=torch.long), r"calibration batch 0 must be a non-empty integer"),
    (torch.full((1, 8), 500), r"token ids in \[500, 500\], outside the model's vocabulary \[0, 96\)"),
    ({"input_ids": [[1, 2, 3]]}, r"calibration batch 0\['input_ids'\] is a list, not a tensor"),
])
def test_bad_calibration_batches_are_named(batch: Any, message: str) -> None:
    model = tiny_model(LLAMA)
    with pytest.raises((ValueError, TypeError), match=message):
        hf_compress.compress(model, WHITENED, calibration=[batch], progress=False)


def test_calibration_of_padding_only_is_an_error_not_a_silent_fallback() -> None:
    batch = {"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": torch.zeros(1, 8, dtype=torch.long)}
    plan = CompressionConfig(modules={"q_proj": CodebookConfig(bits=3)})  # jlcm: it fell back to plain k-means
    with pytest.raises(ValueError, match=r"no calibration token reached model\.layers\.0\.self_attn\.q_proj"):
        hf_compress.compress(tiny_model(LLAMA), plan, calibration=[batch], progress=False)


@pytest.mark.parametrize(("cfg", "message"), [
    (TTEmbeddingConfig(format="svd", ranks=[64]), r"rank 64 store 10240 parameters, not fewer than .* 6144"),
    (TTEmbeddingConfig(format="per_token", shape=[8, 8], ranks=[8]), r"TT ranks \[8\] store"),
    (SubspaceEmbeddingConfig(num_subspaces=2, num_rows=96), r"num_rows = 96 rows per table .* no fewer\s+parameters"),
])
def test_explicit_sizes_that_save_nothing_are_warned_about(cfg: Any, message: str) -> None:
    with pytest.warns(UserWarning, match=message):
        hf_compress.compress(tiny_model(LLAMA), CompressionConfig(modules={"embed_tokens": cfg}), progress=False)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: TTEmbeddingConfig(shape=[3, 5, 7]), r"TTEmbeddingConfig.shape shapes the tensor train .*='adaptive'"),
    (lambda: TTEmbeddingConfig(format="per_token", vocab_shape=[8, 12]), r"TTEmbeddingConfig.vocab_shape shapes"),
    (lambda: hf_compress.ProductTwinConfig(rank=4, parts="qk", vo_rank=2), r"vo_rank sizes the VO twin"),
])
def test_options_the_chosen_format_ignores_are_refused(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_a_layer_level_error_names_the_module_being_compressed() -> None:
    plan = CompressionConfig(modules={"up_proj": CodebookConfig(bits=3, method="kmeans", vector_dim=3)})
    with pytest.raises(ValueError, match=r"CodebookLinear\(64->\d+\): vector_dim 3") as err:
        hf_compress.compress(tiny_model(LLAMA), plan, progress=False)
    assert "while compressing model.layers.0.mlp.up_proj with CodebookConfig" in "".join(err.value.__notes__)


def test_calibration_dicts_may_carry_other_model_arguments() -> None:
    batches = [{"input_ids": b, "use_cache": False} for b in calibration_batches(LLAMA)]
    model = hf_compress.compress(tiny_model(LLAMA), WHITENED, calibration=batches, progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, hf_compress.LowRankLinear)


def test_resize_token_embeddings_with_a_compressed_head_changes_nothing() -> None:
    """An untied low-rank head cannot be resized: refused before transformers resizes the dense table (which left a
    100-row table, a 96-row head and vocab_size 96)."""
    dense = tiny_model(LLAMA)
    dense.config.tie_word_embeddings = False
    dense.lm_head.weight = torch.nn.Parameter(dense.lm_head.weight.detach().clone())
    model = hf_compress.compress(dense, CompressionConfig(modules={"lm_head": LowRankConfig(rank=4)}), progress=False)
    with pytest.raises(TypeError, match=r"output head is a compressed LowRankLinear.*resize the dense model first"):
        model.resize_token_embeddings(100)
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == 96
    assert model.resize_token_embeddings(96) is model.get_input_embeddings()  # no change: no error


def test_a_registered_custom_method_round_trips_through_a_saved_checkpoint(tmp_path: Path) -> None:
    """``register_method(name, Config, fn)`` with a config class that sets no ``registry_name``: the plan's JSON
    ``"type"`` was written empty and the checkpoint did not reload ('unknown compression method'). A name that
    contradicts the class's ``registry_name`` is refused."""
    import dataclasses

    from hf_compress.layers.lowrank import LowRankLinear
    from hf_compress.registry import _METHODS

    @dataclasses.dataclass
    class HalfRankConfig(hf_compress.MethodConfig):
        keep: float = 0.5

    def compress_half(module, cfg, ctx):
        return LowRankLinear.from_dense(module, max(1, int(cfg.keep * min(module.weight.shape))))

    try:
        hf_compress.register_method("test_half_rank", HalfRankConfig, compress_half)
        assert HalfRankConfig.registry_name == "test_half_rank"
        model = hf_compress.compress(tiny_model(LLAMA), CompressionConfig(modules={"q_proj": HalfRankConfig()}),
                                     progress=False)
        model.save_pretrained(tmp_path / "m")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        assert isinstance(again.model.layers[0].self_attn.q_proj, LowRankLinear)
        with torch.no_grad():
            assert torch.equal(again(**LLAMA.inputs()).logits, model(**LLAMA.inputs()).logits)
        with pytest.raises(ValueError, match=r"registry_name is 'test_half_rank'; they must match"):
            hf_compress.register_method("other_name", HalfRankConfig, compress_half)
    finally:
        _METHODS.pop("test_half_rank", None)
