"""``benchmarks.speech.voice_utterances``: which (voice, sentence) pairs a heal round hears."""

from __future__ import annotations

import pytest

from benchmarks import speech


@pytest.fixture(autouse=True)
def _no_synthesis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speech, "synthesize_all", lambda utterances, workers=None: None)


def _pairs(offset: int) -> set[tuple[str, str]]:
    texts = [f"sentence {i}" for i in range(8)]
    return {(u.voice, u.text) for u in speech.voice_utterances(["a", "b"], texts, 2, offset)}


@pytest.mark.parametrize("offset, expected", [
    (0, {("a", "sentence 0"), ("a", "sentence 1"), ("b", "sentence 2"), ("b", "sentence 3")}),
    (4, {("a", "sentence 4"), ("a", "sentence 5"), ("b", "sentence 6"), ("b", "sentence 7")}),
    (7, {("a", "sentence 7"), ("a", "sentence 0"), ("b", "sentence 1"), ("b", "sentence 2")}),  # wraps
])
def test_offset_shifts_every_voice_slice(offset: int, expected: set[tuple[str, str]]) -> None:
    assert _pairs(offset) == expected


def test_offset_by_the_slices_gives_unheard_pairs() -> None:
    assert not _pairs(0) & _pairs(4)


@pytest.mark.parametrize("texts, per_voice, offset", [([], 2, 0), (["x"], 0, 0), (["x"], 1, -1)])
def test_bad_arguments_are_rejected(texts: list[str], per_voice: int, offset: int) -> None:
    with pytest.raises(ValueError, match="voice_utterances"):
        speech.voice_utterances(["a"], texts, per_voice, offset)


def test_speaker_lora_rows_count_one_adapter() -> None:
    """The adaptwin suite's LoRA rows add one speaker adapter (r·(in+out) per targeted linear) to the size."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import ARCHS, tiny_model

    from benchmarks.suites.adaptwin import _size, adapter_size, encoder_params, with_adapter
    from hf_compress.adapters import encoder_targets, lora_config

    model = tiny_model(next(a for a in ARCHS if a.name == "whisper"))
    targets = encoder_targets(model)
    adapter = adapter_size(model, lora_config(r=2, target_modules=targets))
    want = sum(2 * (m.in_features + m.out_features) for n, m in model.named_modules() if n in targets)
    assert adapter == {"adapter_params": want, "adapter_encoder_params": want} and want > 0
    assert not any("lora_" in n for n, _ in model.named_parameters())  # the model itself is left alone
    dense = encoder_params(model)
    size = with_adapter(_size(model, dense), adapter, dense)
    assert size["encoder_params"] == dense + want and size["encoder_reduction"] == round(-want / dense, 4)
