"""Tiny random models built from configs (fast, offline), one per architecture the tests cover."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers

import hf_compress


@dataclass(frozen=True)
class Arch:
    """One architecture row of the table-driven tests."""

    name: str
    make_config: Callable[[], transformers.PretrainedConfig]
    model_class: type
    auto_class: type  # transformers Auto class that reloads it
    compressed_auto: type  # hf_compress AutoCompressed* class
    attn_pattern: str  # pattern matching the attention projections
    mlp_pattern: str
    generates: bool

    def inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        cfg = self.make_config()
        if self.name == "whisper":
            feats = torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g)
            dec = torch.randint(0, cfg.vocab_size, (batch, 4), generator=g)
            return {"input_features": feats, "decoder_input_ids": dec}
        return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)}


def _llama() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )


def _gpt2() -> transformers.PretrainedConfig:
    return transformers.GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64)


def _bert() -> transformers.PretrainedConfig:
    return transformers.BertConfig(
        vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )


def _whisper() -> transformers.PretrainedConfig:
    return transformers.WhisperConfig(
        vocab_size=96, d_model=48, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=16, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
        eos_token_id=2, bos_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
    )


ARCHS = [
    Arch("llama", _llama, transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM,
         hf_compress.AutoCompressedModelForCausalLM, r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$", True),
    Arch("gpt2", _gpt2, transformers.GPT2LMHeadModel, transformers.AutoModelForCausalLM,
         hf_compress.AutoCompressedModelForCausalLM, r"attn\.(c_attn|c_proj)$", r"mlp\.(c_fc|c_proj)$", True),
    Arch("bert", _bert, transformers.BertModel, transformers.AutoModel,
         hf_compress.AutoCompressedModel, r"attention\.self\.(query|key|value)$", r"(intermediate|output)\.dense$",
         False),
    Arch("whisper", _whisper, transformers.WhisperForConditionalGeneration, transformers.AutoModelForSpeechSeq2Seq,
         hf_compress.AutoCompressedModelForSpeechSeq2Seq, r"(self_attn|encoder_attn)\.(q|k|v|out)_proj$",
         r"fc(1|2)$", True),
]


@pytest.fixture(params=ARCHS, ids=[a.name for a in ARCHS])
def arch(request: pytest.FixtureRequest) -> Arch:
    return request.param


def tiny_model(arch: Arch, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return arch.model_class(arch.make_config()).eval()


@pytest.fixture
def dense_dir(arch: Arch, tmp_path_factory: pytest.TempPathFactory) -> tuple[Arch, str]:
    """A saved dense tiny checkpoint of ``arch`` (what a user would pass as a Hub id)."""
    path = tmp_path_factory.mktemp(f"dense-{arch.name}")
    tiny_model(arch).save_pretrained(path)
    return arch, str(path)


# module pattern of the token embedding, per architecture row
EMBED = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings", "whisper": r"decoder\.embed_tokens"}


def calibration_batches(arch: Arch, n: int = 2) -> list[Any]:
    """``n`` calibration batches of ``arch``: input-id tensors, or Whisper's input dicts."""
    batches = [arch.inputs(seed=s) for s in range(n)]
    return batches if arch.name == "whisper" else [b["input_ids"] for b in batches]


def model_output(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Logits, or the last hidden state for base models, without gradients."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def short_generate(model: torch.nn.Module, arch: Arch, inputs: dict[str, Any]) -> torch.Tensor:
    """Three greedy tokens (from audio features for Whisper)."""
    if arch.name == "whisper":
        return model.generate(inputs["input_features"], max_new_tokens=3)
    return model.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False, pad_token_id=0)


def run_save_reload(model: torch.nn.Module, arch: Arch, path: Any) -> tuple[Any, dict[str, Any], torch.Tensor]:
    """Forward (finite), ``generate`` where the family generates, save to ``path`` as safetensors only, reload with
    the architecture's Auto class. Returns ``(reloaded, inputs, logits before saving)``."""
    inputs = arch.inputs()
    logits = model_output(model, inputs)
    assert torch.isfinite(logits).all()
    if arch.generates:
        assert short_generate(model, arch, inputs).shape[0] == 2
    model.save_pretrained(path)
    assert (path / "model.safetensors").exists()
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    return arch.auto_class.from_pretrained(path), inputs, logits
