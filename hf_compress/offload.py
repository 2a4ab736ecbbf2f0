"""accelerate dispatch of compressed models: which layer classes to preload, and one hook per compressed layer."""

from __future__ import annotations

from torch import nn


def compressed_layer_class_names() -> list[str]:
    """Class names of the registered compressed layers: accelerate's ``preload_module_classes`` for
    ``load_checkpoint_and_dispatch``/``dispatch_model`` with offloading (see :func:`group_offload_hooks`)."""
    from .registry import _LAYERS

    return sorted({cls.__name__ for cls in _LAYERS.values()})


def group_offload_hooks(model: nn.Module) -> None:
    """Give every dispatched compressed layer one accelerate hook that places all its tensors (submodules included).

    accelerate hooks each module with direct tensors and onloads/moves them in that module's ``forward``; compressed
    layers keep factors in ``ParameterList``s that are never called, and a ``TiedEmbeddingHead`` reads its table
    outside the table's forward, so each such layer is re-hooked as with ``preload_module_classes``. Called by the
    compressed classes' ``from_pretrained`` when a ``device_map`` was used.
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import PrefixedDataset

    from .registry import _LAYERS

    layer_types = tuple(_LAYERS.values())
    done: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, layer_types) or any(name.startswith(d + ".") for d in done):
            continue
        hooks = [(sub, getattr(sub, "_hf_hook", None)) for sub in module.modules()]
        aligned = [h for _, h in hooks if isinstance(h, AlignDevicesHook)]
        own = module.__dict__.get("_hf_hook")
        if not aligned or len(aligned) != sum(h is not None for _, h in hooks) or (
                isinstance(own, AlignDevicesHook) and (own.place_submodules or len(aligned) == 1)):
            continue  # nothing dispatched, other hook kinds, or one hook that already covers every tensor
        first = next((h for h in aligned if h.offload), aligned[0])
        for sub, hook in hooks:  # detach without onloading (remove_hook_from_module would restore the weights)
            if hook is not None:
                sub.forward = sub.__dict__.pop("_old_forward")
                del sub._hf_hook
        weights = None if first.weights_map is None else PrefixedDataset(first.weights_map.dataset, f"{name}.")
        add_hook_to_module(module, AlignDevicesHook(
            execution_device=first.execution_device, offload=first.offload, weights_map=weights,
            offload_buffers=first.offload_buffers, place_submodules=True, skip_keys=first.skip_keys,
            tied_params_map=first.tied_params_map))
        done.append(name)
