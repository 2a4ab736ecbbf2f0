"""hf_compress.healing.heal_encoder on a tiny random Whisper with a twin + low-rank compressed encoder."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ARCHS, tiny_model

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig
from hf_compress.adapters import encoder_targets, lora_config, train_speaker_adapter
from hf_compress.healing import _concat, _Distiller, distill_logits, heal_encoder
from hf_compress.methods.adaptwin import ProductTwinConfig

WHISPER = next(a for a in ARCHS if a.name == "whisper")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture()
def setup() -> tuple:
    sys.path.insert(0, str(EXAMPLES))
    from adaptwin_speaker import TinyProcessor

    teacher = tiny_model(WHISPER)
    plan = CompressionConfig(modules={r"encoder\.layers\.\d+\.self_attn$": ProductTwinConfig(rank=3),
                                      r"encoder\.layers\.\d+\.fc1$": LowRankConfig(rank=4)})
    student = hf_compress.compress(copy.deepcopy(teacher), plan, progress=False)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(400, generator=g).numpy(), "") for _ in range(6)]
    return teacher, student, TinyProcessor(), data


def _gap(model: torch.nn.Module, teacher: torch.nn.Module, feats: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.get_encoder()(feats).last_hidden_state
                      - teacher.get_encoder()(feats).last_hidden_state).pow(2).mean())


def test_heal_merges_and_keeps_structure(setup: tuple, tmp_path: Path) -> None:
    teacher, student, proc, data = setup
    feats = proc.feature_extractor([a for a, _ in data], sampling_rate=16000, return_tensors="pt").input_features
    before, n_params = _gap(student, teacher, feats), sum(p.numel() for p in student.parameters())
    kinds, cls = {n: type(m).__name__ for n, m in student.named_modules()}, type(student)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    healed, stats = heal_encoder(student, proc, data, teacher, r=2, max_seconds=None, max_steps=30, pack=0,
                                 learning_rate=2e-2)
    assert type(healed) is cls and stats["steps"] == 30 and stats["objective"] == "distill"
    assert {n: p.requires_grad for n, p in healed.named_parameters()} == flags  # PEFT's freezing undone
    assert any(flags.values())
    assert {n: type(m).__name__ for n, m in healed.named_modules()} == kinds  # no LoRA wrappers left
    assert sum(p.numel() for p in healed.parameters()) == n_params
    assert _gap(healed, teacher, feats) < 0.5 * before
    # the healed model saves/reloads exactly and takes a speaker adapter like any compressed model
    healed.save_pretrained(tmp_path / "healed")
    reloaded = WHISPER.auto_class.from_pretrained(tmp_path / "healed").eval()
    with torch.no_grad():
        assert torch.equal(reloaded.get_encoder()(feats).last_hidden_state,
                           healed.get_encoder()(feats).last_hidden_state)
    peft_model, _ = train_speaker_adapter(healed, proc, data[:2], "spk", tmp_path / "a",
                                          config=lora_config(r=2, alpha=4, target_modules=encoder_targets(healed)),
                                          max_steps=1, teacher=teacher)
    assert any(n.endswith("lora_A.spk") for n, _ in peft_model.named_modules())


@pytest.mark.parametrize("objective", ["heal", "cache_encoder", "transcripts"])
def test_half_precision_whisper_trains(setup: tuple, objective: str, tmp_path: Path) -> None:
    """The fp32 log-mel features are cast to a bf16 model's dtype (encoder caching, teacher states, training)."""
    teacher, student, proc, data = setup
    teacher, student = teacher.to(torch.bfloat16), student.to(torch.bfloat16)
    if objective == "heal":
        healed, _ = heal_encoder(student, proc, data[:2], teacher, r=2, max_seconds=None, max_steps=2, pack=0)
        assert healed.dtype == torch.bfloat16
    else:
        _, stats = train_speaker_adapter(student, proc, data[:2], "spk", tmp_path, max_steps=2,
                                         cache_encoder=objective == "cache_encoder")
        assert stats["steps"] == 2


def test_heal_rejects_bad_input(setup: tuple, tmp_path: Path) -> None:
    teacher, student, proc, data = setup
    with pytest.raises(ValueError, match="positive int"):
        heal_encoder(student, proc, data, teacher, r=0)
    with pytest.raises(ValueError, match="needs utterances"):
        heal_encoder(student, proc, [], teacher)
    peft_model, _ = train_speaker_adapter(student, proc, data[:2], "spk", tmp_path,
                                          config=lora_config(r=2, alpha=4, target_modules=encoder_targets(student)),
                                          max_steps=1, teacher=teacher)
    with pytest.raises(ValueError, match="merges its LoRA"):
        heal_encoder(peft_model, proc, data, teacher)


# ---- distill_logits: any compressed model toward its dense teacher ---------------------------------------------
def _kl(model: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=ids).logits, -1)
        s = torch.log_softmax(model(input_ids=ids).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in ("llama", "gpt2")], ids=lambda a: a.name)
def test_distill_logits_trains_codebooks_toward_teacher(arch: Any) -> None:
    from hf_compress.layers.codebook import CodebookLinear
    from hf_compress.methods.jlcm import CodebookConfig, freeze_codebooks, mark_codebooks_trainable

    teacher = tiny_model(arch)
    with torch.no_grad():  # sharper output distributions than the tiny init's near-uniform ones
        for p in teacher.parameters():
            p.mul_(4 if p.dim() == 2 else 1)
    student = hf_compress.compress(copy.deepcopy(teacher), CompressionConfig(
        modules={arch.mlp_pattern: CodebookConfig(bits=2, method="rtn")}), progress=False)
    names = mark_codebooks_trainable(student)
    frozen = {n: p.clone() for n, p in student.named_parameters() if not p.requires_grad}
    indices = {n: b.clone() for n, b in student.named_buffers() if n.endswith("indices")}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 96, (1, 16), generator=g) for _ in range(8)]
    held_out = torch.randint(0, 96, (4, 16), generator=g)
    before = _kl(student, teacher, held_out)
    stats = distill_logits(student, teacher, batches, max_steps=30, batch_size=4, learning_rate=1e-3)
    assert stats["steps"] == 30 and stats["trainable_params"] == sum(
        p.numel() for n, p in student.named_parameters() if n in names)
    assert freeze_codebooks(student) == sum(1 for n, _ in student.named_modules() if re.search(arch.mlp_pattern, n))
    layer = next(m for m in student.modules() if isinstance(m, CodebookLinear))
    assert layer.codebooks.dtype == layer.scales.dtype == torch.float16 and not layer.codebooks.requires_grad
    assert _kl(student, teacher, held_out) < 0.8 * before  # measured 0.59x (llama), 0.64x (gpt2)
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    assert all(torch.equal(b, indices[n]) for n, b in student.named_buffers() if n in indices)
    assert all(p.requires_grad for p in teacher.parameters()) and not student.training  # the teacher as given


def test_distill_logits_errors() -> None:
    arch = ARCHS[0]
    teacher, student = tiny_model(arch), tiny_model(arch)
    ids = [torch.zeros(1, 8, dtype=torch.long)]
    for p in student.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameter.*mark_codebooks_trainable"):
        distill_logits(student, teacher, ids)
    student.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="needs calibration batches"):
        distill_logits(student, teacher, [])
    ragged = [{"input_ids": torch.zeros(1, n, dtype=torch.long), "attention_mask": torch.ones(1, n, dtype=torch.long)}
              for n in (8, 9)]  # ids with their own masks are not padded
    with pytest.raises(ValueError, match="differ in the shape of 'input_ids'"):
        distill_logits(student, teacher, ragged, max_steps=1, batch_size=2)
    with pytest.raises(ValueError, match="differ in keys"):
        distill_logits(student, teacher, [ragged[0], {"input_ids": torch.zeros(1, 8, dtype=torch.long)}],
                       max_steps=1, batch_size=2)


def test_distill_pads_ragged_ids_and_masks_the_loss() -> None:
    """Right-padded rows give the token-mean KL of the unpadded rows (padding neither changes the causal logits nor
    enters the mean)."""
    arch = next(a for a in ARCHS if a.name == "llama")
    teacher, student = tiny_model(arch), tiny_model(arch, seed=1)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 96, (1, n), generator=g) for n in (5, 8)]
    batch = _concat([{"input_ids": r} for r in rows])
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].sum().item() == 13
    wrapper = _Distiller(student, teacher, "logits")
    with torch.no_grad():
        padded = float(wrapper(**batch)["loss"])
        expected = sum(float(wrapper(input_ids=r)["loss"]) * r.shape[1] for r in rows) / 13
    assert padded == pytest.approx(expected, rel=1e-5)


def test_distill_logits_whisper_variable_length_transcripts() -> None:
    """Whisper batches (equal ``input_features``, transcripts of different lengths) train through the padding."""
    from hf_compress.methods.jlcm import CodebookConfig, freeze_codebooks, mark_codebooks_trainable

    teacher = tiny_model(WHISPER)
    student = hf_compress.compress(copy.deepcopy(teacher), CompressionConfig(
        modules={WHISPER.mlp_pattern: CodebookConfig(bits=2, method="rtn")}), progress=False)
    mark_codebooks_trainable(student)
    g = torch.Generator().manual_seed(0)
    mels, frames = teacher.config.num_mel_bins, 2 * teacher.config.max_source_positions
    batches = [{"input_features": torch.randn(1, mels, frames, generator=g),
                "decoder_input_ids": torch.randint(0, 96, (1, n), generator=g)} for n in (3, 5, 7, 4)]
    wrapper = _Distiller(student, teacher, "logits")
    with torch.no_grad():
        before = float(wrapper(**_concat(batches))["loss"])
    stats = distill_logits(student, teacher, batches, max_steps=20, batch_size=4, learning_rate=1e-2)
    freeze_codebooks(student)
    with torch.no_grad():
        after = float(wrapper(**_concat(batches))["loss"])
    assert stats["steps"] == 20 and after < 0.8 * before



@pytest.mark.parametrize("features", [torch.float32, torch.bfloat16], ids=["fp32-features", "bf16-features"])
def test_distill_logits_whisper_student_in_another_dtype(features: torch.dtype) -> None:
    """An fp32 teacher and a bf16 student each get the speech features in their own dtype (either model crashed
    on the other's dtype: 'Input type ... and bias type ... should be the same')."""
    from hf_compress.methods.jlcm import CodebookConfig, mark_codebooks_trainable

    teacher = tiny_model(WHISPER)
    student = hf_compress.compress(copy.deepcopy(teacher).to(torch.bfloat16), CompressionConfig(
        modules={WHISPER.mlp_pattern: CodebookConfig(bits=2, method="rtn")}), progress=False)
    mark_codebooks_trainable(student)
    g = torch.Generator().manual_seed(0)
    mels, frames = teacher.config.num_mel_bins, 2 * teacher.config.max_source_positions
    batches = [{"input_features": torch.randn(1, mels, frames, generator=g).to(features),
                "decoder_input_ids": torch.randint(0, 96, (1, 4), generator=g)} for _ in range(2)]
    stats = distill_logits(student, teacher, batches, max_steps=2, batch_size=1)
    assert stats["steps"] == 2 and student.dtype == torch.bfloat16 and teacher.dtype == torch.float32
