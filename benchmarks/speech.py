"""Synthetic speech for WER: news sentences spoken by espeak-ng voices, 16 kHz mono 16-bit WAV, cached.

Needs the Debian packages ``espeak-ng`` and ``sox`` (``apt-get install -y espeak-ng sox``). Sentences come from the
news text (``lee_background.cor``, see :mod:`benchmarks.data`); the train/test sentence split is the same for every
voice and the two splits share no sentence. Files live in ``<cache>/data/speech/<voice>/<sha1 of text>.wav``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

SAMPLE_RATE = 16_000
DEFAULT_VOICES = ("en-us", "en-gb", "en-us+f3")
_CLEAN = re.compile(r"[A-Z][A-Za-z ,.;:'?!\-]*[.?!]")
_ABBREV = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Sen|Rep|Gov|Lt|Col|Capt|Prof|No|Co|Inc|Ltd|vs|[A-Z])\.$")


@dataclass(frozen=True)
class Utterance:
    """One synthesized utterance: WAV path (16 kHz mono int16), reference text, espeak-ng voice."""

    path: Path
    text: str
    voice: str


def speech_dir() -> Path:
    """``<cache>/data/speech`` (created)."""
    from .data import cache_dir

    path = cache_dir() / "speech"
    path.mkdir(parents=True, exist_ok=True)
    return path


def news_sentences(min_words: int = 5, max_words: int = 25) -> list[str]:
    """Clean, deduplicated sentences of the news text in corpus order: ASCII letters and plain punctuation only
    (no digits, so spoken-number spelling cannot dominate WER), ``min_words``..``max_words`` words."""
    from .data import calibration_text

    out, seen = [], set()
    for article in calibration_text().splitlines():
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", article.strip()):
            sent = re.sub(r"\s+", " ", sent).strip()
            if not _CLEAN.fullmatch(sent) or "--" in sent or _ABBREV.search(sent):
                continue
            if not min_words <= len(sent.split()) <= max_words:
                continue
            key = re.sub(r"[^a-z ]", "", sent.lower())
            if key not in seen:
                seen.add(key)
                out.append(sent)
    return out


def _tools() -> tuple[str, str]:
    espeak, sox = shutil.which("espeak-ng"), shutil.which("sox")
    if espeak is None or sox is None:
        missing = " and ".join(n for n, p in (("espeak-ng", espeak), ("sox", sox)) if p is None)
        raise RuntimeError(f"benchmarks.speech: {missing} not found on PATH. Install the Debian packages with "
                           "`apt-get update && apt-get install -y espeak-ng sox`.")
    return espeak, sox


def utterance_path(voice: str, text: str) -> Path:
    """Cache path of ``text`` spoken by ``voice``."""
    digest = hashlib.sha1(f"{voice}\n{text}".encode()).hexdigest()[:16]
    return speech_dir() / re.sub(r"[^A-Za-z0-9_.-]", "_", voice) / f"{digest}.wav"


def synthesize(voice: str, text: str, out: Path) -> Path:
    """Speak ``text`` with espeak-ng ``voice`` into ``out`` (16 kHz mono 16-bit WAV, written atomically)."""
    espeak, sox = _tools()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw, conv = Path(tmp) / "raw.wav", Path(tmp) / "out.wav"
        proc = subprocess.run([espeak, "-v", voice, "-w", str(raw), "--stdin"], input=text.encode(),
                              capture_output=True)
        if proc.returncode or not raw.exists():
            raise RuntimeError(f"espeak-ng -v {voice} failed: {proc.stderr.decode(errors='replace').strip()}")
        proc = subprocess.run([sox, str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(conv)],
                              capture_output=True)
        if proc.returncode:
            raise RuntimeError(f"sox failed: {proc.stderr.decode(errors='replace').strip()}")
        os.replace(conv, out)
    return out


def synthesize_all(utterances: list[Utterance], workers: int | None = None) -> None:
    """Synthesize the utterances whose WAV is not cached yet, in parallel over the CPU cores (progress bar)."""
    todo = [u for u in utterances if not u.path.exists()]
    if not todo:
        return
    _tools()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        futures = [pool.submit(synthesize, u.voice, u.text, u.path) for u in todo]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="espeak-ng", unit="utt"):
            fut.result()


def speech_set(voices: tuple[str, ...] = DEFAULT_VOICES, n_per_voice: int = 300, test_fraction: float = 1 / 3,
               seed: int = 0) -> dict[str, dict[str, list[Utterance]]]:
    """``{voice: {"train": [...], "test": [...]}}``: ``n_per_voice`` sentences per voice (default 200 train / 100 test),
    the same sentences and split for every voice, train and test disjoint. Synthesizes what is not cached.

    The order is a seeded permutation of :func:`news_sentences`: test = its first ``round(n * test_fraction)``,
    train = the rest up to ``n_per_voice``, so smaller sets are prefixes of larger ones.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"speech_set: test_fraction must be in (0, 1), got {test_fraction}")
    sents = news_sentences()
    if n_per_voice > len(sents):
        raise ValueError(f"speech_set: only {len(sents)} clean news sentences, asked for n_per_voice={n_per_voice}")
    order = np.random.default_rng(seed).permutation(len(sents))
    n_test = max(1, round(n_per_voice * test_fraction))
    split = {"test": [sents[i] for i in order[:n_test]], "train": [sents[i] for i in order[n_test:n_per_voice]]}
    out = {v: {k: [Utterance(utterance_path(v, t), t, v) for t in texts] for k, texts in split.items()}
           for v in voices}
    synthesize_all([u for v in out.values() for part in ("train", "test") for u in v[part]])
    return out


def voice_utterances(voices: Sequence[str], texts: Sequence[str], per_voice: int,
                     offset: int = 0) -> list[Utterance]:
    """``per_voice`` of ``texts`` spoken by each of ``voices``, a different (wrapping) slice of ``texts`` per voice
    (more distinct sentences than one shared slice), every slice shifted by ``offset`` sentences (a later round can
    take (voice, sentence) pairs an earlier one did not); synthesizes what is not cached. Pass train sentences (e.g.
    ``speech_set(...)[v]["train"]`` texts) to keep every test sentence unheard."""
    if not texts or per_voice < 1 or offset < 0:
        raise ValueError(f"voice_utterances: needs texts, per_voice >= 1 and offset >= 0, got {len(texts)} texts, "
                         f"per_voice={per_voice}, offset={offset}")
    picked = [(v, texts[(offset + i * per_voice + j) % len(texts)])
              for i, v in enumerate(voices) for j in range(per_voice)]
    utts = [Utterance(utterance_path(v, t), t, v) for v, t in picked]
    synthesize_all(utts)
    return utts


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Samples ``[n]`` float32 in [-1, 1] of a 16 kHz mono 16-bit WAV (stdlib :mod:`wave`)."""
    with wave.open(str(path), "rb") as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"load_audio: {path} is {w.getframerate()} Hz, {w.getnchannels()} ch, "
                             f"{8 * w.getsampwidth()} bit; expected 16000 Hz mono 16-bit "
                             "(convert with `sox in.wav -r 16000 -c 1 -b 16 out.wav`)")
        frames = w.readframes(w.getnframes())
    return (np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0)
