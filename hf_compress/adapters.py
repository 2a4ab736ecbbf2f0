"""Per-speaker PEFT LoRA adapters for (compressed) Whisper models, trained with HF ``Seq2SeqTrainer``.

``train_speaker_adapter`` adds a LoRA adapter named after the speaker (the model is wrapped in a ``PeftModel``
on first use), trains only it on that speaker's ``(audio, text)`` pairs, and saves a standard adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``). ``load_speaker_adapter`` / ``set_speaker`` load and
switch adapters at inference. TwinAttention projections are plain ``nn.Linear``s, so the default targets
(``q_proj``, ``v_proj``) need no custom-module registration.

``teacher=dense_model`` trains encoder-side adapters (``encoder_targets(model)``) to make the compressed encoder's
output match the dense encoder's on the speaker's audio (mean squared error over all frames, divided by the mean
square of the teacher's output): no transcripts are used, and every utterance gives ``1500 × d_model`` targets instead
of a few tokens. On Whisper tiny.en with a 30 % smaller encoder (WER > 1 before adaptation), ~12 minutes per voice
brought two of three espeak voices back to their dense WER where decoder-side LoRA on transcripts (an earlier,
shorter run) stayed far above it; an adapter helps its own voice much more than the others
(``benchmarks/results/adaptwin.json``). :func:`hf_compress.healing.heal_encoder` runs the same distillation on
other voices first and merges it into the weights (a speaker-independent heal).

``cache_encoder=True`` trains decoder-side adapters only (``DECODER_TARGETS``, incl. the cross-attention that reads
the encoder states) on encoder outputs computed once per utterance with the frozen (compressed) encoder: on a CPU a
step then costs ~10x less than backpropagating through Whisper's 1500-frame encoder. ``max_seconds`` stops
training after that wall time (whatever ``max_steps`` says); the stats report the steps actually taken.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration import on_cpu
from .speech_audio import (  # noqa: F401  (re-exported: hf_compress.adapters.read_wav etc.)
    SAMPLE_RATE,
    audio_and_text,
    change_speed,
    mel_warp_matrix,
    pack_utterances,
    read_wav,
    warp_features,
)

DEFAULT_TARGETS = ("q_proj", "v_proj")
DECODER_TARGETS = r".*decoder\.layers\.\d+\.((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"
# encoder self-attention projections and FFN linears, including the two factors of a low-rank fc1 / fc2
ENCODER_TARGETS = r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)(\.\w+)?"


def encoder_targets(model: Any) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` (a ``PeftModel``'s base model) matching ``ENCODER_TARGETS``:
    the encoder projections and FFN linears, or the ``down`` / ``up`` factors where low-rank compression replaced
    them (PEFT accepts only the linears themselves). Pass them as ``lora_config(target_modules=...)``."""
    import re

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = [n.replace(".base_layer", "") for n, m in base.named_modules()  # a LoRA-wrapped linear: its own name
             if isinstance(m, torch.nn.Linear) and ".lora_" not in n]
    return [n for n in names if re.fullmatch(ENCODER_TARGETS, n)]


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.0,
                target_modules: Sequence[str] | str = DEFAULT_TARGETS) -> Any:
    """A ``peft.LoraConfig`` for speaker adaptation (``target_modules``: module-name suffixes, or one regex string
    matched against full module names, e.g. ``DECODER_TARGETS``)."""
    from peft import LoraConfig

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")


class SpeechDataset(torch.utils.data.Dataset):
    """``(audio, text)`` pairs as Whisper features ``[n_mels, 3000]`` and label ids (computed once, up front)."""

    def __init__(self, processor: Any, audios: Sequence[np.ndarray], texts: Sequence[str]) -> None:
        if len(audios) != len(texts) or not audios:
            raise ValueError(f"hf_compress.adapters: need as many texts as audios (>= 1), got {len(audios)} audios "
                             f"and {len(texts)} texts.")
        feats = processor.feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        self.features = feats.input_features
        self.labels = [processor.tokenizer(t).input_ids for t in texts]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if getattr(self, "teacher_states", None) is not None:
            return {"input_features": self.features[i], "teacher_states": self.teacher_states[i]}
        if getattr(self, "encoder_states", None) is not None:
            return {"encoder_states": self.encoder_states[i], "labels": self.labels[i]}
        return {"input_features": self.features[i], "labels": self.labels[i]}

    def cache_encoder(self, encoder: torch.nn.Module, batch_size: int = 4) -> None:
        """Replace the features by the frozen ``encoder``'s outputs ``[n, frames, d_model]`` (computed once)."""
        self.encoder_states = encoder_outputs(encoder, self.features, batch_size)

    def cache_teacher(self, encoder: torch.nn.Module, batch_size: int = 4) -> None:
        """Store the dense ``encoder``'s outputs ``[n, frames, d_model]`` as distillation targets."""
        self.teacher_states = encoder_outputs(encoder, self.features, batch_size)


@torch.no_grad()
def encoder_outputs(encoder: torch.nn.Module, features: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """``encoder``'s last hidden states ``[n, frames, d_model]`` (CPU) for ``features [n, n_mels, frames]``, computed
    in eval mode (the encoder's train/eval mode is restored afterwards)."""
    was_training = encoder.training
    encoder.eval()
    weight = next(p for p in encoder.parameters() if p.is_floating_point())
    try:
        return torch.cat([encoder(features[i:i + batch_size].to(weight.device, weight.dtype)).last_hidden_state.cpu()
                          for i in range(0, len(features), batch_size)])
    finally:
        encoder.train(was_training)


class _EncoderDistiller(torch.nn.Module):
    """Trainer-facing wrapper: ``forward(input_features, teacher_states)`` -> ``{"loss"}``, the student encoder's
    mean squared error to the teacher's states divided by ``scale`` (the teacher states' mean square)."""

    def __init__(self, encoder: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.encoder, self.scale = encoder, scale

    def forward(self, input_features: torch.Tensor, teacher_states: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        out = self.encoder(input_features).last_hidden_state
        return {"loss": (out.float() - teacher_states.float()).pow(2).mean() / self.scale}


class SpeechCollator:
    """Stacks features and pads labels with ``-100``; drops a leading decoder-start token (the model adds it)."""

    def __init__(self, decoder_start_token_id: int) -> None:
        self.start = decoder_start_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "teacher_states" in items[0]:
            return {k: torch.stack([x[k] for x in items]) for k in ("input_features", "teacher_states")}
        labels = [list(x["labels"]) for x in items]
        if all(seq and seq[0] == self.start for seq in labels):
            labels = [seq[1:] for seq in labels]
        width = max(len(seq) for seq in labels)
        padded = torch.full((len(labels), width), -100, dtype=torch.long)
        for i, seq in enumerate(labels):
            padded[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        if "encoder_states" in items[0]:
            return {"encoder_outputs": (torch.stack([x["encoder_states"] for x in items]),), "labels": padded}
        return {"input_features": torch.stack([x["input_features"] for x in items]), "labels": padded}


def add_speaker_adapter(model: Any, speaker: str, config: Any = None) -> Any:
    """Return a ``PeftModel`` with a fresh LoRA adapter ``speaker`` added (and active); wraps ``model`` if needed."""
    from peft import PeftModel, get_peft_model

    config = config or lora_config()
    if isinstance(model, PeftModel):
        if speaker in model.peft_config:
            raise ValueError(f"hf_compress.adapters: adapter {speaker!r} already exists; pick another speaker name "
                             "or delete it with model.delete_adapter(name).")
        model.add_adapter(speaker, config)
        model.set_adapter(speaker)
        return model
    return get_peft_model(model, config, adapter_name=speaker)


def _time_limit(seconds: float) -> Any:
    """A ``TrainerCallback`` stopping training once ``seconds`` of wall time have passed since ``on_train_begin``."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.perf_counter() - self.t0 >= seconds:
                control.should_training_stop = True

    return TimeLimit()


def train_speaker_adapter(model: Any, processor: Any, utterances: Sequence[Any], speaker: str,
                          output_dir: str | Path, config: Any = None, max_steps: int = 60, batch_size: int = 4,
                          learning_rate: float = 1e-3, seed: int = 0, max_seconds: float | None = None,
                          cache_encoder: bool = False, lr_scheduler: str = "linear",
                          warmup_steps: int | None = None, teacher: Any = None,
                          pack: int = 0, speeds: Sequence[float] = (1.0,),
                          warps: Sequence[float] = (1.0,)) -> tuple[Any, dict[str, Any]]:
    """Train LoRA adapter ``speaker`` on ``utterances`` with ``Seq2SeqTrainer`` and save it to
    ``output_dir/speaker`` (standard PEFT folder). Returns ``(peft_model, {"seconds", "train_loss", "path",
    "steps", "utterances", …})``; the base weights stay frozen. ``seconds`` includes the encoder caching of
    ``cache_encoder=True`` (decoder-side targets only: ``config`` defaults to ``lora_config(target_modules=
    DECODER_TARGETS)`` then);
    ``max_seconds`` caps the training wall time. ``warmup_steps`` defaults to ``max_steps // 10`` (at most 10, so a
    time-capped run with a generous ``max_steps`` still reaches the full learning rate). ``teacher``: the dense
    model; the adapter (encoder-side: ``config`` defaults to ``lora_config(target_modules=encoder_targets(model))``;
    otherwise to ``lora_config()``, ``q_proj``/``v_proj``) is trained to match
    its encoder output on this speaker's audio instead of on the transcripts (``"objective": "distill"``).
    ``pack=k`` (with ``teacher``): train on :func:`pack_utterances` windows (``k`` shuffled passes) instead of one
    utterance per window; ``speeds``: speed-perturbation factors drawn per utterance (:func:`pack_utterances`);
    ``warps`` (with ``teacher``): mel-warp factors drawn per window (:func:`warp_features`; the teacher encodes the
    same warped input; one factor per window for the whole run, so include 1.0 to keep unwarped windows): the
    adapter sees this speaker's voice with a longer or shorter vocal tract."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    t_start = time.perf_counter()
    audios, texts = audio_and_text(utterances)
    if tuple(speeds) != (1.0,) and not pack:
        raise ValueError("hf_compress.adapters: speeds= perturbs the packed windows; pass pack=k (k >= 1) too.")
    if pack and teacher is None:
        raise ValueError("hf_compress.adapters: pack= concatenates utterances, which only the distillation objective "
                         "(teacher=dense_model) can use: transcripts would no longer match; drop pack or pass teacher.")
    if pack:
        audios = pack_utterances(audios, repeats=pack, seed=seed, speeds=speeds)
        texts = [""] * len(audios)
    if not warps or any(not float(a) > 0 for a in warps):
        raise ValueError(f"hf_compress.adapters: warps= must be a non-empty list of factors > 0 (1.0 = unwarped), "
                         f"got {list(warps)}.")
    if tuple(warps) != (1.0,) and teacher is None:
        raise ValueError("hf_compress.adapters: warps= perturbs the distillation inputs; pass teacher=dense_model "
                         "too (warped audio no longer matches a transcript's acoustics).")
    data = SpeechDataset(processor, audios, texts)
    data.features = data.features.to(model.dtype)  # log-mel features in the model's dtype (bf16/fp16 models)
    data.features = warp_features(data.features, warps, seed)
    if teacher is not None and cache_encoder:
        raise ValueError("hf_compress.adapters: teacher= trains encoder-side adapters and cache_encoder=True freezes "
                         "the encoder; use one of them.")
    if teacher is not None:
        data.cache_teacher(teacher.get_encoder())
    if config is None:  # the side the objective trains: the encoder with a teacher, the decoder on cached encodings
        config = (lora_config(target_modules=encoder_targets(model)) if teacher is not None else
                  lora_config(target_modules=DECODER_TARGETS) if cache_encoder else None)
    peft_model = add_speaker_adapter(model, speaker, config)
    in_encoder = [n for n, _ in peft_model.named_modules() if f"lora_A.{speaker}" in n and ".encoder." in n]
    if teacher is not None and not in_encoder:
        raise ValueError(f"hf_compress.adapters: teacher= distills the encoder output, but adapter {speaker!r} has no "
                         "encoder module; use lora_config(target_modules=encoder_targets(model)).")
    if cache_encoder:
        if in_encoder:
            raise ValueError(f"hf_compress.adapters: cache_encoder=True freezes the encoder, but adapter {speaker!r} "
                             f"targets encoder modules ({in_encoder[0]}); use lora_config(target_modules="
                             "DECODER_TARGETS).")
        data.cache_encoder(peft_model.base_model.model.get_encoder())
    cache_s = time.perf_counter() - t_start
    start_id = peft_model.base_model.model.config.decoder_start_token_id
    out = Path(output_dir)
    scratch = tempfile.TemporaryDirectory(prefix=f"hf_compress_lora_{speaker}_")  # trainer logs; no checkpoints
    args = Seq2SeqTrainingArguments(
        output_dir=scratch.name, per_device_train_batch_size=batch_size, max_steps=max_steps,
        learning_rate=learning_rate, lr_scheduler_type=lr_scheduler,
        warmup_steps=warmup_steps if warmup_steps is not None else max(1, min(10, max_steps // 10)),
        logging_steps=max(1, max_steps // 5), save_strategy="no", report_to=[], seed=seed,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=on_cpu(peft_model),
        disable_tqdm=True,
    )
    callbacks = [_time_limit(max_seconds)] if max_seconds else None
    trained: Any = peft_model
    if teacher is not None:
        trained = _EncoderDistiller(peft_model.base_model.model.get_encoder(),
                                    float(data.teacher_states.float().pow(2).mean().clamp_min(1e-12)))
    trainer = Seq2SeqTrainer(model=trained, args=args, train_dataset=data, data_collator=SpeechCollator(start_id),
                             callbacks=callbacks)
    try:
        result = trainer.train()
    finally:
        scratch.cleanup()
    seconds = time.perf_counter() - t_start
    data.encoder_states = data.teacher_states = None
    path = save_speaker_adapter(peft_model, speaker, out)
    peft_model.eval()
    return peft_model, {"seconds": round(seconds, 1), "encoder_cache_seconds": round(cache_s, 1),
                        "train_loss": float(result.training_loss), "path": str(path),
                        "steps": int(trainer.state.global_step), "max_steps": max_steps,
                        "utterances": len(utterances), "windows": len(data),
                        "batch_size": batch_size, "objective": "transcripts" if teacher is None else "distill"}


def save_speaker_adapter(model: Any, speaker: str, output_dir: str | Path) -> Path:
    """Save adapter ``speaker`` as a standard PEFT folder ``output_dir/speaker`` (safetensors); returns it."""
    model.save_pretrained(str(output_dir), selected_adapters=[speaker], safe_serialization=True)
    # PEFT writes non-default adapters to output_dir/<name>; the default adapter lands in output_dir itself.
    return Path(output_dir) / speaker if speaker != "default" else Path(output_dir)


def load_speaker_adapter(model: Any, path: str | Path, speaker: str) -> Any:
    """Load the adapter folder ``path`` as ``speaker`` (wrapping ``model`` in a ``PeftModel`` if needed); active."""
    from peft import PeftModel

    if not (Path(path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"hf_compress.adapters: {path} has no adapter_config.json; pass the folder "
                                "train_speaker_adapter / save_speaker_adapter wrote.")
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=speaker)
    else:
        model = PeftModel.from_pretrained(model, str(path), adapter_name=speaker)
    model.set_adapter(speaker)
    model.eval()
    return model


def set_speaker(model: Any, speaker: str) -> Any:
    """Activate adapter ``speaker`` (``model.set_adapter``), with a clear error listing the loaded ones."""
    known = list(getattr(model, "peft_config", {}) or {})
    if speaker not in known:
        raise ValueError(f"hf_compress.adapters: no adapter {speaker!r} is loaded (loaded: {known}); load it with "
                         "load_speaker_adapter(model, path, speaker).")
    model.set_adapter(speaker)
    return model
