"""Distillation of compressed embedding tables (subspace / TT) against the dense model with ``transformers.Trainer``:
only the compressed tables (and optionally norms) train; hidden states / logits of the student match the teacher's on
text rows and, optionally, on vocabulary tokens shown one at a time."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..calibration import on_cpu, restored_training_state
from ..healing import _Distiller
from ..layers.subspace import SubspaceEmbedding
from ..layers.tt_embedding import TiedEmbeddingHead

__all__ = ["distill", "distillation_loss", "isolated_token_rows"]


def _register_output_recording(model: nn.Module) -> None:
    """Make ``output_hidden_states`` work on models re-typed in place by ``compress`` (transformers 5 keys its
    output-capturing registry by class, filled in ``PreTrainedModel.__init__``, which re-typing skips)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # older/newer transformers without the registry
        return
    for m in model.modules():
        flags = getattr(m, "_can_record_outputs", None)
        if flags and hasattr(m, "config") and not _CAN_RECORD_REGISTRY.get(m):
            _CAN_RECORD_REGISTRY[m] = flags


def distillation_loss(student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor],
                      loss: str = "auto") -> float:
    """Mean distillation loss of ``student`` over ``batches`` (each ``[b, seq]`` token ids), no gradients."""
    _register_output_recording(student)
    wrap = _Distiller(student, teacher, _loss_kind(student, loss)).eval()
    with torch.no_grad():
        return float(torch.stack([wrap(b)["loss"] for b in batches]).mean())


def _loss_kind(student: nn.Module, loss: str) -> str:
    if loss not in ("auto", "hidden", "logits", "both"):
        raise ValueError(f"hf_compress.subspace.distill: loss must be auto|hidden|logits|both, got {loss!r}.")
    if loss != "auto":
        return loss
    return "both" if any(isinstance(m, TiedEmbeddingHead) for m in student.modules()) else "hidden"


def isolated_token_rows(tokenizer: Any, vocab_size: int) -> tuple[list[int], list[int], torch.Tensor]:
    """``(prefix, suffix, ids)``: the special tokens the tokenizer puts around one token (e.g. ``[CLS]``/``[SEP]``,
    or a BOS) and the non-special token ids ``[k]`` below ``vocab_size`` that :func:`distill` samples."""
    full = list(tokenizer("a")["input_ids"])
    body = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    at = next((i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body), None)
    if not body or at is None:
        raise ValueError("hf_compress.subspace.distill: cannot find the text tokens inside tokenizer('a'); pass "
                         "isolated_tokens=0 for this tokenizer.")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = torch.tensor([i for i in range(vocab_size) if i not in special])
    return full[:at], full[at + len(body):], ids


def distill(student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor], steps: int = 200,
            lr: float = 1e-3, batch_size: int = 8, loss: str = "auto", train_norms: bool = False,
            progress: bool = True, seed: int = 0, isolated_tokens: int = 0, tokenizer: Any = None
            ) -> dict[str, float]:
    """Train only the student's subspace tables (and norms if ``train_norms``) to match ``teacher``.

    Args:
        student: model with :class:`SubspaceEmbedding` layers (trained in place).
        teacher: the dense model (frozen).
        batches: token-id tensors ``[b, seq]`` (e.g. ``benchmarks.data.calibration_batches``); rows are pooled.
        steps, lr, batch_size: AdamW steps (linear decay), learning rate, rows per step.
        loss: ``"hidden"`` (all hidden states), ``"logits"`` (KL), ``"both"``; ``"auto"`` = ``"both"`` with a
            tied compressed head (the head changed too), else ``"hidden"``.
        isolated_tokens: also, per step, this many vocabulary tokens drawn uniformly (special tokens excluded),
            each alone in the tokenizer's template (``[CLS] t [SEP]``), matched with the same loss. Calibration
            text shows a few thousand distinct tokens; this reaches the rest of the shared tables' users (word-
            level similarity depends on them). Needs ``tokenizer``.
    Returns ``{"loss_before", "loss_after", "trainable_params", "train_s"}`` (losses over ``batches``).
    """
    from transformers import Trainer, TrainingArguments

    kind = _loss_kind(student, loss)
    rows = [r for b in batches for r in b.reshape(-1, b.shape[-1])]
    if not rows or steps < 1:
        raise ValueError("hf_compress.subspace.distill: need at least one calibration batch and steps >= 1.")
    tables = [p for m in student.modules() if isinstance(m, SubspaceEmbedding) for p in m.tables]
    if not tables:
        raise ValueError("hf_compress.subspace.distill: the student has no SubspaceEmbedding; compress it first.")
    norms = [p for m in student.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)]
    collate = _collator(student, tokenizer, isolated_tokens, seed)  # validates before anything changes
    with restored_training_state(student):  # the caller's mode and trainable flags, on success or failure
        for p in student.parameters():
            p.requires_grad_(False)
        train = tables + (norms if train_norms else [])
        for p in train:
            p.requires_grad_(True)
        eval_batches = [torch.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        before = distillation_loss(student, teacher, eval_batches, kind)
        wrap = _Distiller(student, teacher, kind)
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size,
                                     learning_rate=lr, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0,
                                     logging_steps=max(1, steps // 10), save_strategy="no", report_to=[],
                                     use_cpu=on_cpu(student), disable_tqdm=not progress,
                                     remove_unused_columns=False, seed=seed,
                                     dataloader_num_workers=0)
            trainer = Trainer(model=wrap, args=args, train_dataset=[{"input_ids": r} for r in rows],
                              data_collator=collate)
            result = trainer.train()
    student.eval()
    after = distillation_loss(student, teacher, eval_batches, kind)
    return {"loss_before": before, "loss_after": after, "trainable_params": sum(p.numel() for p in train),
            "train_s": float(result.metrics.get("train_runtime", 0.0)), "loss": kind,
            "isolated_tokens": isolated_tokens}


def _collator(student: nn.Module, tokenizer: Any, isolated_tokens: int, seed: int) -> Any:
    """Trainer collator: stacked text rows, plus ``token_ids [isolated_tokens, t]`` drawn with its own seed."""
    if isolated_tokens < 0 or (isolated_tokens and tokenizer is None):
        raise ValueError("hf_compress.subspace.distill: isolated_tokens must be >= 0 and needs tokenizer=...")
    if not isolated_tokens:
        return lambda feats: {"input_ids": torch.stack([f["input_ids"] for f in feats])}
    prefix, suffix, pool = isolated_token_rows(tokenizer, student.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(seed)

    def collate(feats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        drawn = pool[torch.randint(0, len(pool), (isolated_tokens,), generator=gen)]
        cols = [torch.full_like(drawn, i) for i in prefix] + [drawn] + [torch.full_like(drawn, i) for i in suffix]
        return {"input_ids": torch.stack([f["input_ids"] for f in feats]), "token_ids": torch.stack(cols, 1)}

    return collate
