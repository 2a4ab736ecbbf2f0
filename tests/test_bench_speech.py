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
