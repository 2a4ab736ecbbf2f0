"""PEFT LoRA on compressed token tables (TT, TT-matrix, adaptive-rank, subspace, codebook).

PEFT's LoRA wraps ``nn.Linear`` / ``nn.Embedding``; hf_compress's token tables are other modules, so
``get_peft_model`` refuses them ("Target module ... is not supported"). :func:`register_compressed_lora` registers
:class:`LoraCompressedEmbedding` for every :class:`~hf_compress.layers.tt_embedding.CompressedEmbedding` through
PEFT's custom-module API::

    from peft import LoraConfig, PeftModel, get_peft_model
    from hf_compress.lora import register_compressed_lora

    config = register_compressed_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    model = get_peft_model(model, config)
    ...
    # adapter_config.json does not record the registration: register again when loading
    config = register_compressed_lora(LoraConfig.from_pretrained(adapter_dir))
    model = PeftModel.from_pretrained(base, adapter_dir, config=config)

The adapter adds ``scaling · (A[:, ids])ᵀ Bᵀ`` (``A [r, V]``, ``B [d, r]``, times the table's ``embed_scale``) to the
compressed lookup, exactly what PEFT's ``lora.Embedding`` adds to a dense table; the compressed factors stay frozen
and compressed. As with a dense tied table, a tied head does not see the adapter. The adapter cannot be merged into
the compressed factors (that would recompress the table): ``merge`` raises; keep it unmerged, or merge it into the
dense model and compress again. PEFT merges module by module, so ``merge_and_unload`` may have merged the adapters
of modules before the table when it raises: reload the model then. DoRA is refused (its weight norm would rebuild the
dense table on every forward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Embedding as _LoraEmbedding

from .layers.tt_embedding import CompressedEmbedding


class LoraCompressedEmbedding(_LoraEmbedding):
    """PEFT ``lora.Embedding`` over a compressed table: ``ids [...]`` -> ``table(ids) + LoRA(ids)``, ``[..., d]``."""

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def _get_base_layer_device_and_dtype(self, base_layer: torch.nn.Module) -> tuple[Any, Any]:
        # the table's ``weight`` property materializes the whole dense table; read the dtype rows are computed in
        # (a codebook table's anchor: its fp16 codebooks are storage) or else a floating factor's
        anchor = getattr(base_layer, "compute_dtype_anchor", None)
        tensors = [anchor] if isinstance(anchor, torch.Tensor) else []
        for p in [*tensors, *base_layer.parameters(), *base_layer.buffers()]:
            if p.is_floating_point():
                return p.device, p.dtype
        return None, None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        if getattr(config, "use_dora", False):
            raise ValueError(
                f"hf_compress: DoRA on the compressed table {type(self.get_base_layer()).__name__} would rebuild the "
                "whole dense [V, d] table on every forward (its weight norm); use plain LoRA (use_dora=False). PEFT "
                "wraps module by module: modules before this table may already carry DoRA, so rebuild the model."
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_embed_scale(self) -> torch.Tensor | None:
        scale = self.get_base_layer().embed_scale
        return None if scale is None else torch.tensor(scale)

    def _embed(self, input: torch.Tensor, weight: torch.Tensor, input_fn: Any = None,
               output_fn: Any = None) -> torch.Tensor:
        if input_fn is not None:
            input = input_fn((input,))
        out = F.embedding(input, weight, padding_idx=self.get_base_layer().padding_idx)
        return out if output_fn is None else output_fn(out)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"hf_compress: the LoRA adapter on the compressed table {type(self.get_base_layer()).__name__} cannot be "
            "merged into its compressed factors (that would recompress the table). Keep the adapters unmerged "
            "(PeftModel inference works as is), or merge into the dense model and compress again. PEFT merges "
            "module by module: adapters before this table may already be merged, so reload the model."
        )

    def unmerge(self) -> None:
        """Nothing to undo: the adapter is never merged."""


def register_compressed_lora(config: Any) -> Any:
    """Let the ``peft.LoraConfig`` ``config`` target compressed token tables; returns ``config``."""
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"hf_compress: register_compressed_lora takes a peft.LoraConfig, got {type(config).__name__}."
        )
    config._register_custom_module({CompressedEmbedding: LoraCompressedEmbedding})
    return config
