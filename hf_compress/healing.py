"""Speaker-independent healing of a compressed Whisper encoder before per-speaker adaptation.

``heal_encoder(model, processor, utterances, teacher)`` distills the compressed encoder toward the dense
``teacher``'s output on ``utterances`` from *several* voices (the objective of
``adapters.train_speaker_adapter(teacher=...)``: mean squared error of the encoder output, over all frames), through an
encoder-side LoRA that is then merged into the weights (``merge_and_unload``). The model keeps the same modules and
parameter count (a LoRA on a low-rank factor or a twin projection merges into that plain ``nn.Linear``), so it
saves, reloads and takes per-speaker adapters exactly as before. Use voices other than those you evaluate on: the
heal is then a generic recovery step, and a speaker adapter on top only has to fix what is left for its speaker.
This step is ours, not the AdaPTwin paper's (which adapts the compressed model per speaker directly).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

from .adapters import encoder_targets, lora_config, train_speaker_adapter

HEAL_ADAPTER = "heal"


def heal_encoder(model: Any, processor: Any, utterances: Sequence[Any], teacher: Any, r: int = 16,
                 max_seconds: float | None = 600.0, max_steps: int = 5000, batch_size: int = 4,
                 learning_rate: float = 1e-3, pack: int = 3, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Distill ``model``'s encoder toward ``teacher``'s on ``utterances`` (``(audio [n] @ 16 kHz, text)`` pairs or
    objects with ``.path``/``.text``; texts unused) through a rank-``r`` LoRA on ``encoder_targets(model)``, merged
    into the weights. Returns ``(model, stats)``: the same (non-PEFT) model object type with healed weights and
    ``train_speaker_adapter``'s statistics (``seconds`` includes the teacher-output caching). Training stops at
    ``max_seconds`` wall time or ``max_steps``; ``pack``: utterances packed per 30 s window
    (:func:`hf_compress.adapters.pack_utterances`, that many shuffled passes; 0 = one utterance a window)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError("hf_compress.healing: heal_encoder merges its LoRA into the weights; pass the compressed "
                         "model before adding speaker adapters (or call merge_and_unload() / get_base_model() first).")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"hf_compress.healing: r must be a positive int (the heal LoRA rank), got {r!r}.")
    if not utterances:
        raise ValueError("hf_compress.healing: heal_encoder needs utterances (a few minutes of speech, "
                         "several voices).")
    targets = encoder_targets(model)
    if not targets:
        raise ValueError("hf_compress.healing: no encoder linear matches adapters.ENCODER_TARGETS; heal_encoder "
                         "supports Whisper-style encoders (encoder.layers.N.self_attn / fc1 / fc2).")
    with tempfile.TemporaryDirectory(prefix="hf_compress_heal_") as tmp:
        peft_model, stats = train_speaker_adapter(
            model, processor, utterances, HEAL_ADAPTER, tmp, config=lora_config(r=r, alpha=2 * r,
                                                                               target_modules=targets),
            max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
            max_seconds=max_seconds, lr_scheduler="constant_with_warmup", warmup_steps=3, teacher=teacher, pack=pack)
    healed = peft_model.merge_and_unload()
    healed.eval()
    stats = {k: v for k, v in stats.items() if k != "path"}
    return healed, {**stats, "lora_r": r}
