"""One registry for compression methods and compressed layer types.

A *method* turns a dense module into a compressed one (algorithm side); a *layer type* rebuilds an
empty compressed module from its JSON spec when a checkpoint is loaded (runtime side). Method modules
register themselves on import, so a new method plugs in without touching the core.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

if TYPE_CHECKING:
    from .compress import CompressionContext
    from .config import MethodConfig


class CompressFn(Protocol):
    def __call__(self, module: nn.Module, config: MethodConfig, ctx: CompressionContext) -> nn.Module | None:
        """Return the compressed replacement for ``module`` (or ``None`` to leave it dense)."""


@dataclass(frozen=True)
class Method:
    """A registered compression method.

    ``prepare`` (optional) runs once before any module is replaced, with every target module name, and
    returns per-module state (e.g. calibration statistics) that ``compress`` reads from ``ctx.state``.
    """

    name: str
    config_class: type
    compress: CompressFn
    prepare: Callable[..., dict[str, Any]] | None = None


_METHODS: dict[str, Method] = {}
_LAYERS: dict[str, type[nn.Module]] = {}


def register_method(
    name: str, config_class: type, compress: CompressFn, prepare: Callable[..., dict[str, Any]] | None = None
) -> None:
    """Register a compression method under ``name``: the ``"type"`` key of its entries in JSON plans (and in saved
    checkpoints' ``compression_config``), which ``config_class.to_dict()`` writes from ``config_class.registry_name``
    (set to ``name`` here when the class leaves it empty)."""
    if name in _METHODS and _METHODS[name].config_class is not config_class:
        raise ValueError(f"hf_compress: a different method is already registered as {name!r}.")
    own = getattr(config_class, "registry_name", None)
    if own and own != name:
        raise ValueError(f"hf_compress: register_method({name!r}, {config_class.__name__}, ...): the config class's "
                         f"registry_name is {own!r}; they must match (it is the plan's JSON \"type\"): register it "
                         f"as {own!r} or set registry_name = {name!r}.")
    if not own:
        config_class.registry_name = name
    _METHODS[name] = Method(name, config_class, compress, prepare)


def get_method(name: str) -> Method:
    """Look up a method by name; raises a ``ValueError`` listing the known ones."""
    _load_builtin_methods()
    if name not in _METHODS:
        raise ValueError(f"hf_compress: unknown compression method {name!r}; known methods: {sorted(_METHODS)}.")
    return _METHODS[name]


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def register_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: register a compressed layer type (needs ``layer_type``, ``spec()``, ``from_spec()``)."""
    name = getattr(cls, "layer_type", None)
    if not name or not hasattr(cls, "from_spec") or not hasattr(cls, "spec"):
        raise TypeError(f"hf_compress: {cls.__name__} needs a `layer_type` name, `spec()` and `from_spec()`.")
    _LAYERS[name] = cls
    return cls


def is_compressed_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of the registered compressed layer types."""
    return isinstance(module, tuple(_LAYERS.values()))


def layer_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Build an empty compressed layer (shapes only) from its saved JSON spec."""
    _load_builtin_methods()
    kind = spec.get("type")
    if kind not in _LAYERS:
        raise ValueError(
            f"hf_compress: checkpoint names compressed layer type {kind!r}, which this version does not know "
            f"(known: {sorted(_LAYERS)}). Upgrade hf_compress."
        )
    return _LAYERS[kind].from_spec(spec)


def _load_builtin_methods() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods on import)


def resolve_layer_names(model: nn.Module, layers: dict[str, Any]) -> dict[str, str]:
    """Recorded compressed-layer name -> its name in ``model``.

    Names are recorded on the model that was compressed. A base model (``AutoModel``) built from a task model's
    checkpoint drops the ``base_model_prefix`` and skips the task's head (``lm_head``, ``score``); a task model built
    from a base model's checkpoint adds the prefix. A name whose first part ``model`` has but whose module it lacks
    is an error (the config belongs to another architecture).
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    is_base = bool(prefix) and not hasattr(model, prefix)
    out: dict[str, str] = {}
    for name in layers:
        head = name.split(".")[0]
        if is_base and name.startswith(prefix + "."):
            stripped = name[len(prefix) + 1:]
            candidates = [(stripped, stripped.split(".")[0])]  # (name in model, the part of model it lies in)
        elif prefix and not is_base and not name.startswith(prefix + "."):
            candidates = [(name, head), (f"{prefix}.{name}", f"{prefix}.{head}")]
        else:
            candidates = [(name, head)]
        found = next((c for c, _ in candidates if _has_submodule(model, c)), None)
        if found is not None:
            out[name] = found
        elif any(_has_submodule(model, part) for _, part in candidates):  # a part the model has, lacking the module
            raise ValueError(
                f"hf_compress: the checkpoint's compression_config names module {name!r}, which "
                f"{type(model).__name__} does not have; the config does not belong to this architecture."
            )
    return out


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def build_compressed_structure(model: nn.Module, compression_config: dict[str, Any] | None) -> None:
    """Replace the modules named in ``compression_config["layers"]`` by empty compressed layers (shapes only)."""
    layers = (compression_config or {}).get("layers") or {}
    for name, target in resolve_layer_names(model, layers).items():
        try:
            layer = layer_from_spec(layers[name])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"hf_compress: config.json's compression_config.layers[{name!r}] cannot be built "
                             f"({type(err).__name__}: {err}); the entry was edited or damaged: re-save the "
                             "compressed model.") from err
        model.set_submodule(target, layer)
    for module in model.modules():  # layers that read another module (e.g. a head tied to a compressed table)
        if callable(getattr(module, "bind_model", None)):
            module.bind_model(model)
    _check_tied_head(model)


def _check_tied_head(model: nn.Module) -> None:
    """A dense output head cannot be tied to a compressed table (a base model's checkpoint read by a task class)."""
    from .layers.tt_embedding import CompressedEmbedding

    config = getattr(model, "config", None)
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (getattr(config, "tie_word_embeddings", False) and callable(get_in) and callable(get_out)):
        return
    table, head = get_in(), get_out()
    own = dict(head.named_parameters(recurse=False)) if isinstance(head, nn.Module) else {}
    if isinstance(table, CompressedEmbedding) and "weight" in own:  # (a TiedEmbeddingHead holds no weight)
        raise ValueError(f"hf_compress: this checkpoint's token table is compressed and tied to an output head that "
                         f"it does not hold (it was saved from a base model); {type(model).__name__} cannot tie a "
                         "dense head to it. Load it with the class it was saved from, or compress the task model "
                         "itself (its tied head then reads the compressed table).")


def check_loaded_layers(info: dict[str, Any], names: list[str]) -> None:
    """Raise if ``from_pretrained``'s loading ``info`` shows factor tensors of the compressed layers ``names``
    missing, or compressed tensors stored for a layer the config no longer lists (its dense weight would be random)."""
    missing = [k for k in info.get("missing_keys", []) if any(k.startswith(n + ".") for n in names)]
    unexpected = info.get("unexpected_keys", [])
    unlisted = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])
                       if any(u.startswith(k.rsplit(".", 1)[0] + ".") for u in unexpected)})
    if missing:
        raise ValueError(f"hf_compress: the checkpoint lacks factor tensor(s) {sorted(missing)[:8]} of compressed "
                         f"layers ({len(missing)} missing). The weights file is incomplete or does not match "
                         "config.json's compression_config; re-save the compressed model.")
    if unlisted:
        raise ValueError(f"hf_compress: the checkpoint stores compressed tensors for {unlisted[:4]}, which "
                         "config.json's compression_config does not list (their dense weights would be random). The "
                         "config was edited or belongs to another save; re-save the compressed model.")
