"""Speaker-independent healing of a compressed Whisper encoder before per-speaker adaptation.

``heal_encoder(model, processor, utterances, teacher)`` distills the compressed encoder toward the dense
``teacher``'s output on ``utterances`` from *several* voices (the objective of
``adapters.train_speaker_adapter(teacher=...)``: mean squared error of the encoder output, over all frames), through an
encoder-side LoRA that is then merged into the weights (``merge_and_unload``). The model keeps the same modules and
parameter count (a LoRA on a low-rank factor or a twin projection merges into that plain ``nn.Linear``), so it
saves, reloads and takes per-speaker adapters exactly as before. Use voices other than those you evaluate on: the
heal is then a generic recovery step, and a speaker adapter on top only has to fix what is left for its speaker.
This step is ours, not the AdaPTwin paper's (which adapts the compressed model per speaker directly).

``distill_logits(model, teacher, batches)`` is the general form for any compressed model: it trains whatever
parameters of ``model`` require grad (e.g. after :func:`hf_compress.methods.jlcm.mark_codebooks_trainable`: JLCM
codebooks, scales and norms, indices fixed) with the HF ``Trainer`` to match the dense ``teacher``'s output
distribution, ``KL(p_teacher || p_model)`` per token, averaged over all positions of the batches.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .adapters import _time_limit, encoder_targets, lora_config, train_speaker_adapter
from .calibration import on_cpu, restored_training_state

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
    # PEFT freezes the base and merging does not undo it: the caller's requires_grad flags come back
    with restored_training_state(model), tempfile.TemporaryDirectory(prefix="hf_compress_heal_") as tmp:
        peft_model, stats = train_speaker_adapter(
            model, processor, utterances, HEAL_ADAPTER, tmp, config=lora_config(r=r, alpha=2 * r,
                                                                               target_modules=targets),
            max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
            max_seconds=max_seconds, lr_scheduler="constant_with_warmup", warmup_steps=3, teacher=teacher, pack=pack)
        healed = peft_model.merge_and_unload()
    healed.eval()
    stats = {k: v for k, v in stats.items() if k != "path"}
    return healed, {**stats, "lora_r": r}


def _inputs_for(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device | None) -> dict[str, Any]:
    """``inputs`` on ``device`` (if given), floating ones (speech features) in ``model``'s dtype."""
    dtype = getattr(model, "dtype", None)
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() and isinstance(dtype, torch.dtype) else None)
            for k, v in inputs.items()}


class _Distiller(torch.nn.Module):
    """Trainer-facing wrapper: ``forward(input_ids, ...)`` -> ``{"loss"}`` of the student against the frozen teacher.

    ``loss="hidden"``: mean over all hidden states of ``MSE(s, t) / mean(t²)``; ``"logits"``: token-mean
    ``KL(teacher ‖ student)`` (over ``decoder_attention_mask``, else ``attention_mask``, positions when given);
    ``"both"``: their sum. Both models stay in eval mode (no dropout: the target is the teacher's deterministic
    output). Used by :func:`distill_logits` and :func:`hf_compress.methods.subspace_distill.distill`.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, loss: str) -> None:
        super().__init__()
        self.student, self.loss = student, loss
        self.__dict__["teacher"] = teacher  # not a submodule: never trained, not moved or saved

    def train(self, mode: bool = True) -> _Distiller:
        super().train(mode)
        self.student.eval()
        return self

    def forward(self, input_ids: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,
                num_items_in_batch: Any = None, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``input_ids [b, seq]`` text rows (other model inputs, e.g. ``attention_mask``, passed through);
        ``token_ids [k, t]``: isolated-token rows, a second loss term. ``num_items_in_batch`` (from Trainer) unused."""
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        loss = self.match(inputs)
        if token_ids is not None and token_ids.numel():
            loss = loss + self.match({"input_ids": token_ids})
        return {"loss": loss}

    def match(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distillation loss of one batch of model inputs (``input_ids [b, seq]``, ...)."""
        hidden = self.loss in ("hidden", "both")
        first = next(self.teacher.parameters(), None)  # the teacher stays where the caller put it
        where = first.device if first is not None else None
        with torch.no_grad():  # floating inputs (speech features) in each model's own dtype (fp32 teacher, bf16 ...)
            t = self.teacher(**_inputs_for(self.teacher, inputs, where), output_hidden_states=hidden)
        s = self.student(**_inputs_for(self.student, inputs, None), output_hidden_states=hidden)
        here = next(self.student.parameters()).device
        if where is not None and where != here:
            if hidden:
                t.hidden_states = tuple(h.to(here) for h in t.hidden_states)
            if self.loss in ("logits", "both"):
                t.logits = t.logits.to(here)
        loss = next(iter(inputs.values())).new_zeros((), dtype=torch.float32)
        if hidden:
            terms = [(a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean().clamp_min(1e-12)
                     for a, b in zip(s.hidden_states, t.hidden_states)]
            loss = loss + torch.stack(terms).mean()
        if self.loss in ("logits", "both"):
            lt = torch.log_softmax(t.logits.float(), -1)
            kl = (lt.exp() * (lt - torch.log_softmax(s.logits.float(), -1))).sum(-1)  # [b, seq]
            mask = inputs.get("decoder_attention_mask", inputs.get("attention_mask"))
            loss = loss + (kl.mean() if mask is None or mask.shape != kl.shape
                           else (kl * mask).sum() / mask.sum().clamp_min(1))
        return loss


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: Sequence[Any]) -> None:
        self.items = [dict(b) if isinstance(b, Mapping) else {"input_ids": b} for b in batches]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


MASK_FOR = {"input_ids": "attention_mask", "decoder_input_ids": "decoder_attention_mask"}


def _concat(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``[1, ...]`` batches into one. ``input_ids`` / ``decoder_input_ids`` of different lengths are right-padded
    (with 0) and get an ``attention_mask`` / ``decoder_attention_mask`` (the loss skips the padding); every other
    input must have equal shapes."""
    keys = items[0].keys()
    if any(it.keys() != keys for it in items):
        raise ValueError("hf_compress.healing: distill_logits batches differ in keys; give every batch the same "
                         "model inputs.")
    out = {}
    for k in keys:
        if len({tuple(it[k].shape) for it in items}) == 1:
            out[k] = torch.cat([it[k] for it in items])
        elif k in MASK_FOR and MASK_FOR[k] not in keys and all(it[k].dim() == 2 for it in items):
            length = max(it[k].shape[1] for it in items)
            out[k] = torch.cat([torch.nn.functional.pad(it[k], (0, length - it[k].shape[1])) for it in items])
            out[MASK_FOR[k]] = torch.cat([torch.nn.functional.pad(torch.ones_like(it[k]), (0, length - it[k].shape[1]))
                                          for it in items])
        else:
            raise ValueError(f"hf_compress.healing: distill_logits batches differ in the shape of {k!r}; only "
                             "input_ids / decoder_input_ids (without their own masks) are padded. Give equal shapes "
                             "or batch_size=1.")
    return out


def distill_logits(model: torch.nn.Module, teacher: torch.nn.Module, batches: Sequence[Any], max_steps: int = 500,
                   max_seconds: float | None = None, batch_size: int = 4, learning_rate: float = 1e-4,
                   warmup_steps: int = 10, seed: int = 0) -> dict[str, Any]:
    """Train ``model``'s parameters that require grad (in place) to match ``teacher``'s logits on ``batches``
    (``[1, seq]`` input-id tensors or dicts of model inputs with a leading batch dimension of 1, e.g. Whisper's
    ``{input_features [1, mels, frames], decoder_input_ids [1, t]}``; ids of different lengths are right-padded and
    masked, other inputs need equal shapes; ``batch_size`` of them per step) with ``transformers.Trainer`` (AdamW,
    constant rate after warmup). Stops at ``max_steps`` or ``max_seconds`` of training wall time. Returns
    ``{"seconds", "steps", "train_loss", "trainable_params", ...}``; ``model`` is left in eval mode."""
    from transformers import Trainer, TrainingArguments

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("hf_compress.healing: distill_logits found no trainable parameter in the model; mark what "
                         "to train first (e.g. hf_compress.methods.jlcm.mark_codebooks_trainable(model)).")
    if not batches:
        raise ValueError("hf_compress.healing: distill_logits needs calibration batches (token windows).")
    if not isinstance(max_steps, int) or max_steps < 1 or batch_size < 1:
        raise ValueError(f"hf_compress.healing: max_steps and batch_size must be positive ints, got {max_steps!r}, "
                         f"{batch_size!r}.")
    t0 = time.perf_counter()
    with restored_training_state(teacher):  # the caller's teacher as it was, on success or failure
        teacher.eval()
        for p in teacher.parameters():  # the Trainer optimizes every parameter of the wrapper that requires grad
            p.requires_grad_(False)
        with tempfile.TemporaryDirectory(prefix="hf_compress_distill_") as tmp:
            args = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=batch_size, max_steps=max_steps,
                learning_rate=learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=warmup_steps,
                weight_decay=0.0, logging_steps=max(1, max_steps // 10), save_strategy="no", report_to=[], seed=seed,
                remove_unused_columns=False, dataloader_num_workers=0, use_cpu=on_cpu(model),
                disable_tqdm=True)
            trainer = Trainer(model=_Distiller(model, teacher, "logits"), args=args, train_dataset=_Batches(batches),
                              data_collator=_concat, callbacks=[_time_limit(max_seconds)] if max_seconds else None)
            result = trainer.train()
    model.eval()
    return {"seconds": round(time.perf_counter() - t0, 1), "steps": int(trainer.state.global_step),
            "max_steps": max_steps, "train_loss": float(result.training_loss), "trainable_params": trainable,
            "batches": len(batches), "batch_size": batch_size, "learning_rate": learning_rate}
