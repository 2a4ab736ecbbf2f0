"""Greedy transcripts from the ctranslate2 runtime and from HF generation with the same prompt and cap, to check a
conversion token for token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import _MAX_TARGET_POSITIONS, _MOD, SAMPLE_RATE
from .reader import _load_token_table, _token_id


def _features(audio_list: Sequence[np.ndarray], num_mel_bins: int = 80) -> np.ndarray:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE)
    audio = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audio_list]
    return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features.astype(np.float32)


def _strip(ids: Sequence[int], prompt: Sequence[int], eot: int) -> list[int]:
    """Drop a leading ``prompt`` and everything from the first ``eot`` on."""
    ids = [int(t) for t in ids]
    if ids[:len(prompt)] == list(prompt):
        ids = ids[len(prompt):]
    return ids[:ids.index(eot)] if eot in ids else ids


def _cap(max_length: int, prompt_len: int, positions: int = _MAX_TARGET_POSITIONS) -> int:
    if max_length < 1:
        raise ValueError(f"{_MOD}: max_length must be >= 1, got {max_length}.")
    return min(max_length, positions - prompt_len)


def ct2_transcribe(ct2_dir: str | Path, audio_list: Sequence[np.ndarray], max_length: int = 224,
                   batch_size: int = 8, threads: int = 0) -> list[list[int]]:
    """Greedy token ids (prompt and ``<|endoftext|>`` removed) from the ``ctranslate2.models.Whisper`` runtime.

    ``audio_list``: 16 kHz mono float32 waveforms (at most 30 s each). Prompt: ``<|startoftranscript|>``
    (+ ``<|en|><|transcribe|>`` for multilingual models) + ``<|notimestamps|>``; beam size 1, CPU, float32.
    ``max_length`` caps the generated tokens (``<|endoftext|>`` included), like HF ``max_new_tokens``; the default
    224 is what ctranslate2 and OpenAI allow (half the 448-position decoder).
    """
    import ctranslate2

    ct2_dir = Path(ct2_dir)
    if not (ct2_dir / "model.bin").is_file():
        raise ValueError(f"{_MOD}: {ct2_dir} has no model.bin; not a CTranslate2 model folder.")
    model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=threads)
    table = _load_token_table(ct2_dir)
    prompt = ["<|startoftranscript|>"]
    if model.is_multilingual:
        prompt += ["<|en|>", "<|transcribe|>"]
    prompt.append("<|notimestamps|>")
    prompt_ids = [_token_id(table, t) for t in prompt]
    eot = _token_id(table, "<|endoftext|>")
    cap = _cap(max_length, len(prompt_ids))
    # ctranslate2's WhisperReplica::generate decodes at most min(max_length / 2, max_length - start_step) tokens
    # (OpenNMT/CTranslate2#1856); ask for enough and cut to ``cap``.
    ct2_max = max(2 * cap, cap + len(prompt_ids))
    out: list[list[int]] = []
    for start in range(0, len(audio_list), batch_size):
        feats = _features(audio_list[start:start + batch_size], model.n_mels)
        results = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
                                 [prompt_ids] * len(feats), beam_size=1, max_length=ct2_max)
        out.extend(_strip(r.sequences_ids[0], prompt_ids, eot)[:cap] for r in results)
    return out


def hf_transcribe_ids(model: Any, processor: Any, audio_list: Sequence[np.ndarray], max_length: int = 224,
                      batch_size: int = 8) -> list[list[int]]:
    """Greedy token ids from HF generation with the prompt of :func:`ct2_transcribe`, stripped the same way.

    Runs the generic ``GenerationMixin.generate`` with the prompt as ``decoder_input_ids`` and the model's
    ``suppress_tokens`` / ``begin_suppress_tokens``: the same search as ctranslate2. Whisper's own ``generate`` adds
    segment post-processing that, for batches, cuts a transcript at two consecutive timestamp tokens (which a
    degraded model can emit even after ``<|notimestamps|>``); ctranslate2 does not. ``max_length`` caps the generated
    tokens as in :func:`ct2_transcribe`.
    """
    from transformers import GenerationMixin

    gen_cfg = model.generation_config
    prompt = [gen_cfg.decoder_start_token_id]
    if getattr(gen_cfg, "is_multilingual", False):
        prompt += [gen_cfg.lang_to_id["<|en|>"], gen_cfg.task_to_id["transcribe"]]
    prompt.append(gen_cfg.no_timestamps_token_id)
    eot = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, int) else gen_cfg.eos_token_id[0]
    cap = _cap(max_length, len(prompt), model.config.max_target_positions)
    out: list[list[int]] = []
    param = next(model.parameters())
    for start in range(0, len(audio_list), batch_size):
        chunk = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audio_list[start:start + batch_size]]
        feats = processor.feature_extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        decoder_input_ids = torch.tensor([prompt] * len(chunk), device=param.device)
        with torch.inference_mode():
            seqs = GenerationMixin.generate(model, input_features=feats.to(device=param.device, dtype=param.dtype),
                                            decoder_input_ids=decoder_input_ids, num_beams=1, do_sample=False,
                                            max_length=len(prompt) + cap, pad_token_id=eot, eos_token_id=eot)
        out.extend(_strip(s.tolist(), prompt, eot)[:cap] for s in seqs)
    return out
