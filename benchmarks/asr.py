"""Word error rate of Whisper-style speech-to-text models on :mod:`benchmarks.speech` utterances.

Normalisation (:func:`normalize_text`, applied to references and hypotheses alike) is Whisper's own English
normaliser, ``transformers.models.whisper.english_normalizer.EnglishTextNormalizer`` (pure Python, works offline),
with an empty British->American spelling map (that map is a Hub file, ``normalizer.json``), after Unicode NFKC:

* lowercase; text in ``[...]``/``<...>``/``(...)`` and fillers (uh, um, hmm) removed;
* contractions and titles expanded (``won't`` -> ``will not``, ``it's`` -> ``it is``, ``Mr`` -> ``mister``), so
  intra-word apostrophes are resolved by expansion rather than kept; remaining punctuation and diacritics stripped;
* spelled-out numbers become digits on both sides (``five hundred`` -> ``500``, ``five percent`` -> ``5%``), so
  espeak's spoken numbers vs Whisper's digits do not count as errors (the speech set has no digits anyway);
* whitespace collapsed.

:func:`basic_normalize` is the plain alternative (NFKC, lowercase, punctuation stripped except intra-word
apostrophes, digits kept as written, whitespace collapsed).
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .encoder_eval import eval_mode, model_device

_whisper_normalizer: Any = None


def normalize_text(s: str) -> str:
    """Whisper English normalisation (see the module docstring): ``"It's five percent!"`` -> ``"it is 5%"``."""
    global _whisper_normalizer
    if _whisper_normalizer is None:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        _whisper_normalizer = EnglishTextNormalizer({})
    s = _whisper_normalizer(unicodedata.normalize("NFKC", s))
    return re.sub(r"\s+", " ", s).strip()


def basic_normalize(s: str) -> str:
    """NFKC, lowercase, punctuation/symbols -> space except apostrophes between letters/digits, whitespace collapsed:
    ``"Don't  STOP -- 'now'!"`` -> ``"don't stop now"``."""
    s = unicodedata.normalize("NFKC", s).lower().replace("\u2019", "'")
    s = "".join(" " if unicodedata.category(c)[0] in "PS" and c != "'" else c for c in s)
    s = re.sub(r"(?<![^\W_])'|'(?![^\W_])", " ", s)  # apostrophes not between two word characters
    return re.sub(r"\s+", " ", s).strip()


def edit_counts(ref: Sequence[str], hyp: Sequence[str]) -> tuple[int, int, int]:
    """``(substitutions, deletions, insertions)`` of a minimum-edit (Levenshtein) alignment of two word lists."""
    n, m = len(ref), len(hyp)
    # cost[i][j] = (edits, subs, dels, ins) for ref[:i] vs hyp[:j]; ties broken towards fewer edits then substitutions
    prev = [(j, 0, 0, j) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0)] + [(0, 0, 0, 0)] * m
        for j in range(1, m + 1):
            if ref[i - 1] == hyp[j - 1]:
                cur[j] = prev[j - 1]
                continue
            s, d, a = prev[j - 1], prev[j], cur[j - 1]
            cur[j] = min((s[0] + 1, s[1] + 1, s[2], s[3]), (d[0] + 1, d[1], d[2] + 1, d[3]),
                         (a[0] + 1, a[1], a[2], a[3] + 1))
        prev = cur
    return prev[m][1], prev[m][2], prev[m][3]


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (unit costs)."""
    return sum(edit_counts(ref, hyp))


def word_error_rate(refs: Sequence[str], hyps: Sequence[str],
                    normalize: Callable[[str], str] | None = normalize_text) -> float:
    """Corpus WER: total word edits / total reference words, after ``normalize`` (``None``: split as given)."""
    return wer_details(refs, hyps, normalize)["wer"]


def wer_details(refs: Sequence[str], hyps: Sequence[str],
                normalize: Callable[[str], str] | None = normalize_text) -> dict[str, Any]:
    """``{"wer", "ref_words", "edits", "substitutions", "deletions", "insertions"}`` over the corpus."""
    if len(refs) != len(hyps):
        raise ValueError(f"word_error_rate: {len(refs)} references but {len(hyps)} hypotheses")
    norm = normalize or (lambda s: s)
    subs = dels = ins = words = 0
    for r, h in zip(refs, hyps):
        rw, hw = norm(r).split(), norm(h).split()
        s, d, i = edit_counts(rw, hw)
        subs, dels, ins, words = subs + s, dels + d, ins + i, words + len(rw)
    if words == 0:
        raise ValueError("word_error_rate: the references have no words after normalisation")
    edits = subs + dels + ins
    return {"wer": edits / words, "ref_words": words, "edits": edits, "substitutions": subs, "deletions": dels,
            "insertions": ins}


def _generate_kwargs(model: Any, max_new_tokens: int) -> dict[str, Any]:
    gc = model.generation_config
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False}
    if getattr(gc, "is_multilingual", False) and getattr(gc, "lang_to_id", None):
        kwargs.update(language="en", task="transcribe")  # multilingual: force English transcription
    if getattr(gc, "no_timestamps_token_id", None) is not None:
        kwargs["return_timestamps"] = False
    return kwargs


@torch.inference_mode()
def transcribe(model: Any, processor: Any, utterances: Sequence[Any], batch_size: int = 8,
               max_new_tokens: int = 128) -> list[str]:
    """Greedy transcripts (no timestamps; English forced for multilingual Whisper), one per utterance, in order.

    ``utterances``: :class:`benchmarks.speech.Utterance` items (or 1-D float32 16 kHz arrays, each <= 30 s).
    ``processor``: a ``WhisperProcessor`` (feature extractor + tokenizer).
    """
    from .speech import SAMPLE_RATE, load_audio

    fe, tok = getattr(processor, "feature_extractor", None), getattr(processor, "tokenizer", None)
    if fe is None or tok is None:
        raise TypeError("transcribe: pass a WhisperProcessor (with .feature_extractor and .tokenizer), e.g. the "
                        "second value of benchmarks.zoo.load('whisper-tiny.en')")
    device, dtype = model_device(model), next(model.parameters()).dtype
    kwargs = _generate_kwargs(model, max_new_tokens)
    out: list[str] = []
    with eval_mode(model):
        for i in tqdm(range(0, len(utterances), batch_size), desc="transcribe", unit="batch", leave=False):
            audio = [u if not hasattr(u, "path") else load_audio(u.path) for u in utterances[i:i + batch_size]]
            too_long = [len(a) / SAMPLE_RATE for a in audio if len(a) > 30 * SAMPLE_RATE]
            if too_long:
                raise ValueError(f"transcribe: utterance of {too_long[0]:.1f} s; short-form only (<= 30 s)")
            feats = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            ids = model.generate(input_features=feats.to(device=device, dtype=dtype), **kwargs)
            ids = ids.sequences if hasattr(ids, "sequences") else ids
            out.extend(t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True))
    return out


def wer(model: Any, processor: Any, utterances: Sequence[Any], batch_size: int = 8,
        max_new_tokens: int = 128) -> dict[str, Any]:
    """Corpus WER of :func:`transcribe` against ``u.text``: :func:`wer_details` plus ``utterances``, ``seconds``,
    ``normalizer`` and three ``examples`` (reference, hypothesis)."""
    if not utterances:
        raise ValueError("wer: no utterances")
    start = time.perf_counter()
    hyps = transcribe(model, processor, utterances, batch_size=batch_size, max_new_tokens=max_new_tokens)
    refs = [u.text for u in utterances]
    out = wer_details(refs, hyps)
    out.update(utterances=len(refs), seconds=time.perf_counter() - start, normalizer="whisper-english",
               examples=list(zip(refs[:3], hyps[:3])))
    return out
