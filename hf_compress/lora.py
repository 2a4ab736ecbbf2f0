"""PEFT LoRA on compressed modules: token tables (TT, TT-matrix, adaptive-rank, subspace, codebook) and linears
(low-rank, Tucker, codebook).

PEFT's LoRA wraps ``nn.Linear`` / ``nn.Embedding``; hf_compress's layers are other modules, which PEFT refuses
("Target module ... is not supported"), e.g. PEFT's default ``q_proj`` / ``v_proj`` targets once attention is
low-rank. Through PEFT's custom-module API, :class:`LoraCompressedEmbedding` wraps every
:class:`~hf_compress.layers.tt_embedding.CompressedEmbedding` and :class:`LoraCompressedLinear` wraps
``LowRankLinear``, ``TuckerLinear`` and ``CodebookLinear`` (an adapter beside the compressed linear, as QLoRA puts
one beside a quantized linear; the factors or codes stay frozen). ``import hf_compress`` installs that mapping
for every ``LoraConfig`` that meets a compressed layer (:func:`enable_peft_dispatch`: PEFT's
``LoraModel._create_new_module`` registers it on the config just before it would refuse the layer; nothing else
changes), so ``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModelFor*``, ``model.load_adapter``
and ``from_pretrained(adapter_dir)`` work as on a dense model (adapter_config.json does not record the mapping).
:func:`register_compressed_lora` does the same explicitly on one config::

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))

A linear's adapter adds ``scaling · B A x`` to the compressed layer's output. A table's adapter adds
``scaling · (A[:, ids])ᵀ Bᵀ`` (``A [r, V]``, ``B [d, r]``, times the table's ``embed_scale``) to the
compressed lookup, exactly what PEFT's ``lora.Embedding`` adds to a dense table; the compressed factors stay frozen
and compressed. As with a dense tied table, a tied head does not see the adapter. No adapter can be merged into
compressed factors or codes (that would recompress the layer): ``merge`` raises; keep it unmerged, or merge it into
the dense model and compress again (with the dispatch installed, ``merge_and_unload`` and ``merge_adapter`` refuse
before merging any module). DoRA is refused (its weight norm would rebuild the dense weight on every forward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Embedding as _LoraEmbedding
from peft.tuners.lora import Linear as _LoraLinear

from .layers.codebook import CodebookLinear
from .layers.lowrank import LowRankLinear
from .layers.tt_embedding import CompressedEmbedding
from .layers.tucker import TuckerLinear

# PEFT inits that write a residual into the base layer's weight (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA)
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class _CompressedBase:
    """What both adapters need from a compressed base layer without touching its (materializing) ``weight``."""

    def _get_base_layer_device_and_dtype(self, base_layer: torch.nn.Module) -> tuple[Any, Any]:
        # ``weight`` would materialize the dense matrix / table; read the dtype the layer computes in (the codebook
        # layers' compute_dtype_anchor) or a floating tensor's that is not fp16 codebook storage; the device from
        # any tensor (packed indices included)
        anchor = getattr(base_layer, "compute_dtype_anchor", None)
        storage = {id(t) for m in base_layer.modules() if isinstance(m, CodebookLinear) for t in m.storage()}
        tensors = [*([anchor] if isinstance(anchor, torch.Tensor) else []), *base_layer.parameters(),
                   *base_layer.buffers()]
        device = tensors[0].device if tensors else None
        for p in tensors:
            if p.is_floating_point() and id(p) not in storage:
                return p.device, p.dtype
        return device, None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
            raise ValueError(
                f"hf_compress: init_lora_weights={init!r} rewrites the base weight (W - BA), which the compressed "
                f"{type(self.get_base_layer()).__name__} does not store densely; use the default init "
                "(init_lora_weights=True or 'gaussian'), or initialize on the dense model and compress it after."
            )
        if getattr(config, "use_dora", False):
            raise ValueError(
                f"hf_compress: DoRA on the compressed {type(self.get_base_layer()).__name__} would rebuild its whole "
                "dense weight on every forward (its weight norm); use plain LoRA (use_dora=False). PEFT wraps module "
                "by module: modules before this one may already carry DoRA, so rebuild the model."
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if not _merging(self, adapter_names):
            return  # none of this layer's adapters is being merged
        raise ValueError(
            f"hf_compress: the LoRA adapter on the compressed {type(self.get_base_layer()).__name__} cannot be "
            "merged into its compressed factors or codes (that would recompress the layer). Keep the adapters "
            "unmerged (PeftModel inference works as is), or merge into the dense model and compress again."
        )

    def unmerge(self) -> None:
        """Nothing to undo: the adapter is never merged."""


class LoraCompressedLinear(_CompressedBase, _LoraLinear):
    """PEFT ``lora.Linear`` beside a compressed linear: ``x [..., in]`` -> ``layer(x) + scaling·B A x``,
    ``[..., out]`` (``A [r, in]``, ``B [out, r]``)."""

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features


class LoraCompressedEmbedding(_CompressedBase, _LoraEmbedding):
    """PEFT ``lora.Embedding`` over a compressed table: ``ids [...]`` -> ``table(ids) + LoRA(ids)``, ``[..., d]``."""

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def _get_embed_scale(self) -> torch.Tensor | None:
        scale = self.get_base_layer().embed_scale
        return None if scale is None else torch.tensor(scale)

    def _embed(self, input: torch.Tensor, weight: torch.Tensor, input_fn: Any = None,
               output_fn: Any = None) -> torch.Tensor:
        if input_fn is not None:
            input = input_fn((input,))
        out = F.embedding(input, weight, padding_idx=self.get_base_layer().padding_idx)
        return out if output_fn is None else output_fn(out)


_COMPRESSED_LORA = {CompressedEmbedding: LoraCompressedEmbedding, LowRankLinear: LoraCompressedLinear,
                    TuckerLinear: LoraCompressedLinear, CodebookLinear: LoraCompressedLinear}
_DISPATCH_MARK = "_hf_compress_dispatch"


def register_compressed_lora(config: Any) -> Any:
    """Let the ``peft.LoraConfig`` ``config`` target compressed token tables and linears; returns ``config``."""
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"hf_compress: register_compressed_lora takes a peft.LoraConfig, got {type(config).__name__}."
        )
    config._register_custom_module(dict(_COMPRESSED_LORA))
    return config


def enable_peft_dispatch() -> bool:
    """Let every ``peft.LoraConfig`` wrap compressed layers (called by ``import hf_compress``; idempotent).

    Wraps PEFT's ``LoraModel._create_new_module``: when its target is a compressed layer that the config's own
    custom modules do not cover, hf_compress's mapping (:func:`register_compressed_lora`'s) is registered on that
    config first, for the compressed types the config does not map yet. Layers PEFT supports, and configs that
    already map the layer type (yours or ours), are dispatched unchanged. Also wraps ``merge_and_unload`` /
    ``merge_adapter`` (LoRA and mixed models) to refuse, before merging anything, adapters on compressed layers.
    Returns ``False`` (nothing installed; call :func:`register_compressed_lora` yourself) if this PEFT lacks the
    hook."""
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    original = LoraModel.__dict__.get("_create_new_module")
    if not isinstance(original, staticmethod):
        return False
    if getattr(original.__func__, _DISPATCH_MARK, False):
        return True
    create = original.__func__

    def _create_new_module(lora_config: Any, adapter_name: str, target: torch.nn.Module, **kwargs: Any) -> Any:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        mapped = tuple(getattr(lora_config, "_custom_modules", None) or ())
        if isinstance(base, tuple(_COMPRESSED_LORA)):
            _check_not_nested(lora_config, base, kwargs.get("target_name"))
            if not isinstance(base, mapped):
                lora_config._register_custom_module({k: v for k, v in _COMPRESSED_LORA.items() if k not in mapped})
        return create(lora_config, adapter_name, target, **kwargs)

    setattr(_create_new_module, _DISPATCH_MARK, True)
    LoraModel._create_new_module = staticmethod(_create_new_module)
    try:
        from peft.tuners.mixed.model import MixedModel
    except ImportError:  # (a PEFT without mixed models)
        MixedModel = None
    for tuner in (LoraModel, MixedModel):  # refuse before merging anything, not half way (also PeftMixedModel)
        for name in ("merge_and_unload", "merge_adapter"):
            if tuner is not None and callable(getattr(tuner, name, None)):
                setattr(tuner, name, _refusing_compressed_merges(getattr(tuner, name)))
    return True


def _check_not_nested(config: Any, layer: torch.nn.Module, key: str | None) -> None:
    """Refuse an adapter on compressed ``layer`` (module ``key``) that would nest LoRA inside LoRA: its factors
    already carry adapters, or ``config`` also targets them (by name, full name or regex)."""
    from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    kind = type(layer).__name__
    wrapped = [n for n, m in layer.named_modules() if n and isinstance(m, BaseTunerLayer)]
    if wrapped:
        raise ValueError(
            f"hf_compress: {key or kind}: the factors {wrapped} of this compressed {kind} already carry LoRA "
            "adapters; an adapter on the layer itself would nest LoRA inside LoRA, which does not reload. Give every "
            "adapter of a model the same kind of target: the compressed layers (e.g. 'q_proj') or their factors.")
    both = [n for n, _ in layer.named_children() if key and check_target_module_exists(config, f"{key}.{n}")]
    if both:
        raise ValueError(
            f"hf_compress: target_modules names both the compressed {kind} {key} and its factors {both}; target "
            "one or the other (the outer layer, e.g. 'q_proj', or its factors).")


def _merging(layer: Any, adapter_names: list[str] | None) -> list[str]:
    """The adapters of compressed ``layer`` that a merge of ``adapter_names`` (default: the active ones) would
    merge."""
    if isinstance(adapter_names, str):  # as PEFT's own check: a string would be read letter by letter
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    held = {*layer.lora_A, *layer.lora_embedding_A}
    return [n for n in (layer.active_adapters if adapter_names is None else adapter_names) if n in held]


def _refusing_compressed_merges(merge: Any) -> Any:
    """``merge`` (``LoraModel.merge_and_unload`` / ``merge_adapter``), refusing up front when an adapter it would
    merge sits on a compressed layer (PEFT merges module by module: a refusal half way leaves some merged)."""
    import functools
    import inspect

    signature = inspect.signature(merge)

    @functools.wraps(merge)
    def refusing(self: Any, *args: Any, **kwargs: Any) -> Any:
        names = signature.bind(self, *args, **kwargs).arguments.get("adapter_names")
        kinds = sorted({type(m.get_base_layer()).__name__ for m in self.model.modules()
                        if isinstance(m, _CompressedBase) and _merging(m, names)})
        if kinds:
            raise ValueError(
                f"hf_compress: LoRA adapters on compressed layers ({', '.join(kinds)}) cannot be merged into their "
                "compressed factors or codes (that would recompress the layers); nothing was merged. Keep them "
                "unmerged (PeftModel inference works as is), merge only adapters on dense layers (adapter_names=), "
                "or merge into the dense model and compress again.")
        return merge(self, *args, **kwargs)

    return refusing
