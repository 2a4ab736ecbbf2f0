"""``compress(model, config)``: walk a model's modules and swap matched ones for compressed layers, in place."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import as_batches, truncated_passes
from .config import CompressionConfig, MethodConfig, matches
from .registry import get_method, is_compressed_layer


@dataclass
class CompressionContext:
    """What a method's compress function may read besides the module itself.

    ``calibration`` is a sequence of model input batches (``LongTensor [batch, seq]`` of token ids or dicts of
    model inputs); ``state`` is what the method's ``prepare`` returned for this module.
    """

    model: nn.Module
    name: str
    calibration: Sequence[Any] | None = None
    state: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def find_targets(model: nn.Module, config: CompressionConfig) -> dict[str, tuple[str, MethodConfig]]:
    """Module name -> (pattern, method config) for every module the plan compresses (outermost match wins)."""
    targets: dict[str, tuple[str, MethodConfig]] = {}
    done = compressed_layer_names(model)
    for name, _ in model.named_modules():
        if not name or within(name, done):
            continue
        if any(name.startswith(t + ".") for t in targets):
            continue
        hit = config.method_for(name)
        if hit is not None:
            targets[name] = hit
    return targets


def compressed_layer_names(model: nn.Module) -> list[str]:
    """Names of the outermost compressed layers in ``model`` (their factors are plain modules inside them)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if name and is_compressed_layer(module) and not within(name, names):
            names.append(name)
    return names


def within(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or lies inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def compressed_layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Module name -> JSON spec of every outermost compressed layer in ``model``."""
    return {name: model.get_submodule(name).spec() for name in compressed_layer_names(model)}


def compress(
    model: nn.Module,
    config: CompressionConfig | dict[str, Any],
    calibration: Iterable[Any] | None = None,
    progress: bool = True,
    before_target: Callable[[str], None] | None = None,
) -> nn.Module:
    """Compress ``model`` in place following ``config`` and return it.

    A Hugging Face model of a supported architecture becomes its registered compressed class (e.g.
    ``CompressedLlamaForCausalLM``), so ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` round-trip.
    Each dense module is freed as soon as its replacement is built, so at most one extra layer is alive.

    Args:
        model: the model to compress (any ``nn.Module``; HF models also get their config updated).
        config: the plan, or its ``to_dict()`` form.
        calibration: model input batches for methods that need activations (see each method's docs). Targets
            whose config sets ``sequential=True`` are prepared block by block (:func:`stage_of`), just before
            their block is compressed, on the partly compressed model.
        progress: show a tqdm bar over the modules.
        before_target: called with each target's name just before it is compressed (the streamed
            compress-on-load of :mod:`hf_compress.streaming` reads that module's dense weights there).
    """
    if isinstance(config, dict):
        config = CompressionConfig.from_dict(config)
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"hf_compress.compress: config must be a CompressionConfig, got {type(config).__name__}.")
    calibration = as_batches(calibration, getattr(getattr(model, "config", None), "vocab_size", None))

    from .modeling import adopt_compressed_class

    was = (type(model), getattr(model, "config", None))
    adopt_compressed_class(model)  # fails early, with the supported list, on unsupported HF architectures
    try:
        targets = find_targets(model, config)
        for name in targets:
            _check_dense(name, model.get_submodule(name), targets[name][1])
        if before_target is None:  # (the streamed load reads each target's weights in before_target: checked there)
            for name in targets:
                _check_loaded(name, model.get_submodule(name))
        for pattern in config.modules:
            if not any(p == pattern for p, _ in targets.values()):
                hit = [n for n in compressed_layer_names(model) if matches(pattern, n)]
                warnings.warn(
                    f"hf_compress: pattern {pattern!r} matched only already-compressed modules ({hit[0]}, ...), left "
                    "as they are; compress the dense model to change them." if hit else
                    f"hf_compress: pattern {pattern!r} matched no module of {type(model).__name__}; "
                    "check the module names with `[n for n, _ in model.named_modules()]`.",
                    UserWarning,
                    stacklevel=2,
                )

        stages: dict[str, list[str]] = {}  # sequential targets by block, in model order
        for name, (_, cfg) in targets.items():
            if getattr(cfg, "sequential", False):
                stages.setdefault(stage_of(name), []).append(name)
        sequential = {n for names in stages.values() for n in names}
        states = _prepare(model, {n: t for n, t in targets.items() if n not in sequential}, calibration)
    except BaseException:
        _undo_adopt(model, *was)  # nothing replaced yet: the model is as it was
        raise

    done: list[str] = []
    with torch.no_grad():
        try:
            for name, (_, cfg) in tqdm(targets.items(), desc="hf_compress", disable=not progress or not targets):
                _compress_one(model, name, cfg, stages, sequential, targets, states, calibration, before_target)
                done.append(name)
        except BaseException as err:
            if not done:
                _undo_adopt(model, *was)
            else:  # the replaced modules stay (their dense weights are gone): recorded, so a save reloads as is
                _record(model, config)
                forget_checkpoint(model)
                err.add_note(f"hf_compress: compress() stopped at {name}; {len(done)} module(s) before it are already "
                             f"compressed ({', '.join(done[:3])}{', ...' if len(done) > 3 else ''}) and recorded in "
                             "config.compression_config. Fix the plan and compress the dense model again.")
            raise

    _record(model, config)
    if done:
        forget_checkpoint(model)
    return model


def forget_checkpoint(model: nn.Module) -> None:
    """The model changed in memory: no checkpoint reproduces it until it is saved, so ``model.name_or_path`` (what
    PEFT records as an adapter's ``base_model_name_or_path``) is cleared, as for a model built from a config, and
    ``save_pretrained`` / a push to the main branch set it to where the model went. Otherwise an adapter trained on
    the compressed model would name the dense checkpoint, and ``AutoPeftModelFor*`` would silently put it on the
    dense model. ``config._name_or_path`` (where pipelines find the tokenizer; PEFT's adapter card reads it) is
    kept."""
    for module in model.modules():  # inner models too (model.model of a task model)
        if "name_or_path" in vars(module):
            module.name_or_path = ""


def _compress_one(model: nn.Module, name: str, cfg: MethodConfig, stages: dict[str, list[str]], sequential: set[str],
                  targets: dict[str, tuple[str, MethodConfig]], states: dict[str, Any], calibration: Any,
                  before_target: Callable[[str], None] | None) -> None:
    """Replace target ``name`` by its compressed layer (calibrating its block first if sequential)."""
    method = get_method(cfg.registry_name)
    stage = stages.pop(stage_of(name), None) if name in sequential else None
    if stage:  # calibrate this block on the outputs of the blocks compressed before it
        with truncated_passes():  # each pass stops once the modules it hooks have run
            states.update(_prepare(model, {n: targets[n] for n in stage}, calibration))
    if before_target is not None:  # the streamed load reads this target's weights now
        before_target(name)
        _check_loaded(name, model.get_submodule(name))
    module = model.get_submodule(name)
    tied_to = _tied_input_embedding(model, module)
    ctx = CompressionContext(model=model, name=name, calibration=calibration, state=states.pop(name, None))
    try:
        new = method.compress(module, cfg, ctx)
    except (ValueError, TypeError) as err:  # a layer-level message (e.g. "TuckerLinear(64->64): ...") gets its module
        if name not in str(err):
            err.add_note(f"hf_compress: raised while compressing {name} with {type(cfg).__name__}.")
        raise
    if new is not None and new is not module:
        if not any(p.requires_grad for p in module.parameters()) and any(True for _ in module.parameters()):
            new.requires_grad_(False)  # a frozen dense module stays frozen
        model.set_submodule(name, new)
        if tied_to is not None:  # a head sharing the dense table no longer does: record the model untied
            from .methods.tied import untie

            untie(model, (name, tied_to))


def _undo_adopt(model: nn.Module, cls: type, config: Any) -> None:
    """Undo :func:`hf_compress.modeling.adopt_compressed_class` after a failed compress (class and config back)."""
    if type(model) is cls:
        return
    new = model.config
    model.__class__ = cls
    for module in model.modules():
        if getattr(module, "config", None) is new:
            module.config = config


def _check_dense(name: str, module: nn.Module, cfg: MethodConfig) -> None:
    """Raise if ``module`` already holds compressed layers (e.g. a product twin planned on an attention whose
    projections are low-rank): its method needs the dense weights."""
    inside = [f"{n} ({type(m).__name__})" for n, m in module.named_modules() if is_compressed_layer(m)]
    if inside:
        raise ValueError(
            f"hf_compress: {name}: {type(cfg).__name__} needs the dense module, but {', '.join(inside[:3])} inside it "
            "is already compressed. Compress the dense checkpoint with one plan for every module, or leave "
            f"{name} out of this plan."
        )


def _check_loaded(name: str, module: nn.Module) -> None:
    """Raise if ``module``'s weights are not in memory (meta tensors: offloaded by a ``device_map``, or built under
    ``init_empty_weights``): compressing placeholders would silently give a wrong model."""
    empty = [n for n, p in module.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(
            f"hf_compress: {name}: its weights {empty[:4]} are not loaded (meta tensors, e.g. offloaded to disk by "
            "device_map / max_memory, or built under init_empty_weights), so it cannot be compressed. Load the "
            "layers to compress into memory (no offloading), or use AutoCompressed*.from_pretrained(path, "
            "compression_config=...) without device_map: it streams the dense weights one layer at a time."
        )


def _tied_input_embedding(model: nn.Module, module: nn.Module) -> str | None:
    """Name of the dense input embedding whose weight ``module`` shares, when ``module`` is the model's output head
    (a compressed table's tied head is handled by its method, :mod:`hf_compress.methods.tied`)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)) or get_out() is not module:
        return None
    emb = get_in()
    if not isinstance(emb, nn.Embedding) or emb is module:
        return None
    from .methods.tied import tied_head_name

    if tied_head_name(model, emb) is None:
        return None
    return next(n for n, m in model.named_modules() if m is emb)


def stage_of(name: str) -> str:
    """The block a module belongs to for sequential calibration: its name up to the first numeric component
    (``model.layers.3.mlp.up_proj`` → ``model.layers.3``); a module outside numbered blocks is its own stage."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _prepare(model: nn.Module, targets: dict[str, tuple[str, MethodConfig]],
             calibration: Sequence[Any] | None) -> dict[str, Any]:
    """Run each method's ``prepare`` once over its targets among ``targets``; merged per-module states."""
    by_method: dict[str, list[str]] = {}
    for name, (_, cfg) in targets.items():
        by_method.setdefault(cfg.registry_name, []).append(name)
    states: dict[str, Any] = {}
    for method_name, names in by_method.items():
        method = get_method(method_name)
        if method.prepare is not None:
            states.update(method.prepare(model, {n: targets[n][1] for n in names}, calibration))
    return states


def _record(model: nn.Module, config: CompressionConfig) -> None:
    """Write the plan and the resolved per-layer specs into ``model.config.compression_config``."""
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        return
    previous = dict(getattr(hf_config, "compression_config", None) or {})
    plan = config.to_dict()
    merged_modules = {**previous.get("modules", {}), **plan["modules"]}
    skips = list(dict.fromkeys([*previous.get("skip_modules", []), *plan["skip_modules"]]))
    hf_config.compression_config = {
        **previous,
        "version": plan["version"],
        "modules": merged_modules,
        "skip_modules": skips,
        "layers": compressed_layer_specs(model),
    }
