"""Speech inputs for per-speaker adaptation: 16 kHz WAV reading, speed and vocal-tract-length perturbation, and
packing one speaker's utterances into Whisper's 30 s windows (:mod:`hf_compress.adapters` trains on them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLE_RATE = 16000


def read_wav(path: str | Path) -> np.ndarray:
    """Samples ``[n]`` float32 in [-1, 1] of a 16 kHz mono 16-bit WAV (stdlib ``wave``)."""
    import wave

    with wave.open(str(path), "rb") as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"hf_compress.speech_audio: {path} is not 16 kHz mono 16-bit; convert it with "
                             "`sox in.wav -r 16000 -c 1 -b 16 out.wav`.")
        frames = w.readframes(w.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def audio_and_text(utterances: Sequence[Any]) -> tuple[list[np.ndarray], list[str]]:
    """``Utterance``-like items (``.path``, ``.text``) or ``(audio, text)`` tuples -> (audios, texts)."""
    audios, texts = [], []
    for u in utterances:
        if hasattr(u, "path"):
            audios.append(read_wav(u.path))
            texts.append(u.text)
        else:
            audio, text = u
            audios.append(np.asarray(audio, dtype=np.float32))
            texts.append(text)
    return audios, texts


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """``audio [n]`` played ``factor`` times faster (linear-interpolation resampling: tempo, pitch and formants move
    together, as in Kaldi-style speed perturbation) -> ``[round(n / factor)]``."""
    if factor == 1.0:
        return np.asarray(audio, dtype=np.float32)
    n = len(audio)
    return np.interp(np.arange(max(1, round(n / factor))) * factor, np.arange(n), audio).astype(np.float32)


def mel_warp_matrix(n_mels: int, alpha: float, f_max: float = SAMPLE_RATE / 2) -> torch.Tensor:
    """``[n_mels, n_mels]`` linear-interpolation matrix warping log-mel features along frequency by ``alpha``
    (vocal-tract-length perturbation: output bin ``i`` at frequency ``f_i`` reads the input at ``f_i / alpha``; a
    factor > 1 moves formants and harmonics up, as from a longer to a shorter vocal tract). Bin centres are evenly
    spaced in Slaney mel over ``[0, f_max]``, as in Whisper's filterbank; ``alpha = 1`` gives the identity."""
    if not alpha > 0 or n_mels < 2:
        raise ValueError(f"hf_compress.speech_audio: mel warp needs alpha > 0 and n_mels >= 2, got alpha={alpha}, "
                         f"n_mels={n_mels}.")
    from transformers.audio_utils import hertz_to_mel, mel_to_hertz

    m_max = float(hertz_to_mel(float(f_max), mel_scale="slaney"))
    centres_hz = mel_to_hertz(m_max * np.arange(1, n_mels + 1) / (n_mels + 1), mel_scale="slaney")
    src_mel = hertz_to_mel(centres_hz / alpha, mel_scale="slaney")
    src = torch.from_numpy((n_mels + 1) * src_mel / m_max - 1.0).clamp(0, n_mels - 1)
    src = torch.where((src - src.round()).abs() < 1e-9, src.round(), src)  # exact identity at alpha = 1
    lo = src.floor().long().clamp(max=n_mels - 2)
    frac = (src - lo).float()
    warp = torch.zeros(n_mels, n_mels)
    rows = torch.arange(n_mels)
    warp[rows, lo] = 1.0 - frac
    warp[rows, lo + 1] += frac
    return warp


def warp_features(features: torch.Tensor, alphas: Sequence[float], seed: int = 0) -> torch.Tensor:
    """Each window of ``features [n, n_mels, frames]`` warped along frequency by a factor drawn from ``alphas``
    (:func:`mel_warp_matrix`); ``(1.0,)`` returns ``features`` unchanged."""
    if tuple(alphas) == (1.0,):
        return features
    rng = np.random.default_rng(seed)
    mats = {a: mel_warp_matrix(features.shape[1], a) for a in set(map(float, alphas))}
    picks = rng.choice(np.asarray(alphas, dtype=np.float64), size=len(features))
    return torch.stack([mats[float(a)].to(features.dtype) @ f for a, f in zip(picks, features)])


def pack_utterances(audios: Sequence[np.ndarray], repeats: int = 3, single_fraction: float = 0.25,
                    window_seconds: float = 30.0, gap_seconds: float = 0.3, seed: int = 0,
                    speeds: Sequence[float] = (1.0,)) -> list[np.ndarray]:
    """Whisper-window training inputs from one speaker's utterances ``[n_i]`` (16 kHz): ``repeats`` shuffled passes,
    each utterance either alone (probability ``single_fraction``, the layout of inference: speech then padding) or
    concatenated with the next ones (``gap_seconds`` of silence between) until the next would overflow the
    ``window_seconds`` window. Whisper encodes 30 s whatever the utterance length, so a packed window gives several
    utterances' worth of speech frames for the cost of one. Each utterance is first sped up by a factor drawn from
    ``speeds`` (:func:`change_speed`; ``(1.0,)``: unchanged)."""
    if not audios or repeats < 1 or not 0 <= single_fraction <= 1 or not speeds or min(speeds) <= 0:
        raise ValueError(f"hf_compress.speech_audio: pack_utterances needs >= 1 audio, repeats >= 1, single_fraction "
                         f"in [0, 1] and positive speeds; got {len(audios)} audios, repeats={repeats}, "
                         f"single_fraction={single_fraction}, speeds={list(speeds)}.")
    rng = np.random.default_rng(seed)
    limit, gap = int(window_seconds * SAMPLE_RATE), np.zeros(int(gap_seconds * SAMPLE_RATE), dtype=np.float32)
    windows: list[np.ndarray] = []
    for _ in range(repeats):
        current: list[np.ndarray] = []
        for i in rng.permutation(len(audios)):
            clip = change_speed(audios[i], float(rng.choice(speeds)))[:limit]
            if rng.random() < single_fraction:
                windows.append(clip)
                continue
            if current and sum(map(len, current)) + len(gap) + len(clip) > limit:
                windows.append(np.concatenate(current))
                current = []
            current += [gap, clip] if current else [clip]
        if current:
            windows.append(np.concatenate(current))
    return windows
