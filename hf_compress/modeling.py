"""Registered Hugging Face classes for compressed models, and compress-on-load.

For each supported architecture a small factory makes a config subclass (saved with ``model_type``
``hf_compress_<type>``, one extra field ``compression_config``) and model subclasses of the family's own classes
(``CompressedLlamaForCausalLM(LlamaForCausalLM)``…). State-dict names, tied weights, caches, ``generate``,
``device_map`` and PEFT defaults are therefore inherited; the subclass only rebuilds the compressed layers
recorded in ``config.compression_config["layers"]`` so checkpoints of factors load directly.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto import modeling_auto

from .cards import portable_base_model
from .offload import compressed_layer_class_names, group_offload_hooks  # noqa: F401  (public here too)
from .registry import build_compressed_structure, check_loaded_layers, is_compressed_layer, resolve_layer_names
from .saving import CompressedSaveMixin

PREFIX = "hf_compress_"
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "bert", "whisper",
)
# task -> (transformers Auto class name, mapping of model_type -> class name)
TASKS: dict[str, tuple[str, dict[str, str]]] = {
    "base": ("AutoModel", modeling_auto.MODEL_MAPPING_NAMES),
    "causal-lm": ("AutoModelForCausalLM", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "masked-lm": ("AutoModelForMaskedLM", modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    "sequence-classification": (
        "AutoModelForSequenceClassification", modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    ),
    "speech-seq2seq": ("AutoModelForSpeechSeq2Seq", modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES),
}
_CONFIGS: dict[str, type[PretrainedConfig]] = {}  # base model_type -> compressed config class
_MODELS: dict[type, type[PreTrainedModel]] = {}  # base model class -> compressed model class


class CompressedModelMixin(CompressedSaveMixin):
    """Mixed into each family's model classes: rebuild compressed layers, check loads, save atomically."""

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        build_compressed_structure(self, getattr(config, "compression_config", None))

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the dense floating parameters, as ``PreTrainedModel.dtype``; codebook layers' fp16 codebooks,
        scales and offsets are storage and do not count (else a codebook embedding, the first parameter, would make
        ``save_pretrained`` record ``float16`` and a reload cast every dense layer)."""
        from .layers.codebook import CodebookLinear

        for m in self.modules():  # in parameters() order, stopping at the first dense floating parameter
            storage = m.storage() if isinstance(m, CodebookLinear) else ()
            for p in m.parameters(recurse=False):
                if p.is_floating_point() and not any(p is t for t in storage):
                    return p.dtype
        return super().dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """As transformers'; ``exclude_embeddings`` also leaves out compressed token tables (transformers only
        recognizes ``nn.Embedding``), which ``floating_point_ops`` and the Trainer's FLOP count rely on."""
        from .layers.tt_embedding import CompressedEmbedding

        total = super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        if exclude_embeddings:
            tables = {id(p): p for m in self.modules() if isinstance(m, CompressedEmbedding) for p in m.parameters()}
            total -= sum(p.numel() for p in tables.values() if p.requires_grad or not only_trainable)
        return total

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        """As transformers' for a dense table; a compressed one grows or shrinks through :mod:`hf_compress.vocab`."""
        from .layers.tt_embedding import CompressedEmbedding

        table, head = self.get_input_embeddings(), self.get_output_embeddings()
        size = args[0] if args else kwargs.get("new_num_tokens")
        multiple = args[1] if len(args) > 1 else kwargs.get("pad_to_multiple_of")
        size = -(-size // multiple) * multiple if size is not None and multiple else size
        if size is None or size == getattr(table, "num_embeddings", None):  # a no-op, as transformers': the table
            return table if isinstance(table, CompressedEmbedding) else super().resize_token_embeddings(*args, **kwargs)
        if isinstance(table, CompressedEmbedding):
            kind = type(table)
            ways = [f for f, op in (("hf_compress.vocab.add_tokens(model, tokenizer, new_tokens)", "add_rows"),
                                    ("hf_compress.vocab.keep_tokens / prune_tokens", "keep_rows"))
                    if getattr(kind, op) is not getattr(CompressedEmbedding, op)]
            how = (f"resize it with {' or '.join(ways)}" if ways else
                   "it cannot be resized: resize the dense model first, then compress it")
            raise TypeError(f"hf_compress: {type(self).__name__}'s token table is a compressed {kind.__name__}; {how}.")
        if head is not None and is_compressed_layer(head):  # refused before transformers resizes the table
            raise TypeError(f"hf_compress: {type(self).__name__}'s output head is a compressed {type(head).__name__}, "
                            "which cannot be resized: resize the dense model first, then compress it.")
        return super().resize_token_embeddings(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        layers = (getattr(model.config, "compression_config", None) or {}).get("layers") or {}
        check_loaded_layers(info, _prefixed(model, list(resolve_layer_names(model, layers).values())))
        from .layers.codebook import CodebookLinear

        for module in model.modules():  # loading makes new Parameters: fp16 codebook storage stays frozen
            if isinstance(module, CodebookLinear):
                for p in module.storage():
                    p.requires_grad_(False)
        if getattr(model, "hf_device_map", None):
            group_offload_hooks(model)
        return (model, info) if want_info else model


def _prefixed(model: nn.Module, names: list[str]) -> list[str]:
    """Layer names as they appear in loading-info keys (with and without the base-model prefix)."""
    prefix = getattr(model, "base_model_prefix", "")
    return names + [n[len(prefix) + 1:] for n in names if prefix and n.startswith(prefix + ".")]


def _make_config_class(base: type[PretrainedConfig]) -> type[PretrainedConfig]:
    """``model_type`` stays the family's (PEFT, generate, pipelines read it); config.json says hf_compress_<type>."""
    name = f"Compressed{base.__name__}"
    serialized = PREFIX + base.model_type

    def to_json_string(self: PretrainedConfig, use_diff: bool = True) -> str:  # what config.json holds
        config_dict = {**(self.to_diff_dict() if use_diff else self.to_dict()), "model_type": serialized}
        return json.dumps(self._encode_special_floats(config_dict), indent=2, sort_keys=True) + "\n"

    @classmethod  # type: ignore[misc]
    def from_dict(cls: type[PretrainedConfig], config_dict: dict[str, Any], **kwargs: Any) -> Any:
        if "compression_config" in kwargs:  # e.g. transformers.AutoModel*.from_pretrained(path, compression_config=)
            raise ValueError(
                "hf_compress: compression_config= is not a loading option here: it would replace the compressed "
                "checkpoint's recorded layers. To compress a dense checkpoint on load use hf_compress."
                "AutoCompressedModel*.from_pretrained(path, compression_config=plan); a compressed checkpoint "
                "loads as it is (its plan is in config.json); to compress it further call hf_compress.compress."
            )
        config_dict = {k: v for k, v in config_dict.items() if not (k == "model_type" and v == serialized)}
        return super(config_class, cls).from_dict(config_dict, **kwargs)

    @classmethod  # type: ignore[misc]
    def get_config_dict(cls: type[PretrainedConfig], *args: Any, **kwargs: Any) -> Any:
        config_dict, rest = super(config_class, cls).get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == serialized:  # ours: no "model of another type" warning
            config_dict = {**config_dict, "model_type": base.model_type}
        return config_dict, rest

    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__annotations__": {"compression_config": dict | None},
        "compression_config": None,
        "model_type": base.model_type,
        "serialized_model_type": serialized,
        "to_json_string": to_json_string,
        "from_dict": from_dict,
        "get_config_dict": get_config_dict,
        "__doc__": f"{base.__name__} plus the hf_compress plan and per-layer specs (``compression_config``).",
    }
    config_class = type(name, (base,), namespace)
    return config_class


def _make_model_class(base: type[PreTrainedModel], config_class: type[PretrainedConfig]) -> type[PreTrainedModel]:
    name = f"Compressed{base.__name__}"
    namespace = {"__module__": __name__, "__qualname__": name, "config_class": config_class}
    return type(name, (CompressedModelMixin, base), namespace)


def _register_family(model_type: str) -> None:
    base_config = transformers.CONFIG_MAPPING[model_type]
    config_class = _make_config_class(base_config)
    _CONFIGS[model_type] = config_class
    setattr(sys.modules[__name__], config_class.__name__, config_class)
    transformers.CONFIG_MAPPING.register(config_class.serialized_model_type, config_class, exist_ok=True)
    for auto_name, names in TASKS.values():
        if model_type not in names:
            continue
        base_model = getattr(transformers, names[model_type])
        model_class = _make_model_class(base_model, config_class)
        _MODELS[base_model] = model_class
        setattr(sys.modules[__name__], model_class.__name__, model_class)
        getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)


def register_all() -> None:
    """Make and register the compressed classes of every supported architecture (idempotent)."""
    for model_type in SUPPORTED_MODEL_TYPES:
        if model_type not in _CONFIGS:
            _register_family(model_type)


def base_model_type(config: PretrainedConfig) -> str:
    return config.model_type.removeprefix(PREFIX)


def compressed_config_class(config: PretrainedConfig) -> type[PretrainedConfig]:
    """The compressed config class for a dense or compressed config; clear error if unsupported."""
    model_type = base_model_type(config)
    if model_type not in _CONFIGS:
        raise ValueError(
            f"hf_compress: architecture {model_type!r} is not supported; supported model types: "
            f"{list(SUPPORTED_MODEL_TYPES)}. Open an issue with the model id to request it."
        )
    return _CONFIGS[model_type]


def to_compressed_config(config: PretrainedConfig) -> PretrainedConfig:
    """A compressed-class copy of a dense config (or the config itself if it already is one). A deep copy re-typed,
    so the state ``to_dict`` leaves out (the attention implementation, the commit hash ...) is kept."""
    config_class = compressed_config_class(config)
    if isinstance(config, config_class):
        return config
    new = copy.deepcopy(config)
    new.__class__ = config_class  # the subclass adds only the class-level compression_config default
    return new


def compressed_model_class(model_class: type) -> type[PreTrainedModel]:
    """The registered compressed subclass of a transformers model class."""
    for klass in model_class.__mro__:
        if klass in _MODELS:
            return _MODELS[klass]
    raise ValueError(
        f"hf_compress: {model_class.__name__} is not supported; supported model types: {list(SUPPORTED_MODEL_TYPES)} "
        f"with heads {sorted(TASKS)}."
    )


def adopt_compressed_class(model: nn.Module) -> None:
    """Turn a loaded dense HF model into its compressed subclass in place (no-op for other modules)."""
    if not isinstance(model, PreTrainedModel) or isinstance(model, CompressedModelMixin):
        return
    compressed_config_class(model.config)  # unsupported architecture: clear error with the supported list
    target = compressed_model_class(type(model))
    dense_config = model.config
    model.config = to_compressed_config(dense_config)
    for module in model.modules():  # inner models and attention layers read the same config object
        if getattr(module, "config", None) is dense_config:
            module.config = model.config
    model.config.compression_config = dict(model.config.compression_config or {})
    model.config.compression_config.setdefault("base_model", portable_base_model(model.config.name_or_path))
    model.__class__ = target  # the subclass adds no instance state, so this is a plain re-typing
    _register_output_capture(model)


def _register_output_capture(model: PreTrainedModel) -> None:
    """transformers 5 records which outputs (hidden states, attentions) a class can capture when an instance is
    built, keyed by class; a re-typed model must be registered too, or ``output_hidden_states=True`` yields None."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # older transformers: nothing to register
        return
    _CAN_RECORD_REGISTRY[model] = getattr(model, "_can_record_outputs", None)


def default_task(config: PretrainedConfig) -> str:
    """The head a checkpoint of ``config`` most likely has: its ``architectures`` entry, else the first task
    (speech, causal LM, base) that transformers maps its model type to."""
    model_type = base_model_type(config)
    for arch in getattr(config, "architectures", None) or []:
        arch = arch.removeprefix("Compressed")
        for task, (_, mapping) in TASKS.items():
            if mapping.get(model_type) == arch:
                return task
    for task in ("speech-seq2seq", "causal-lm", "base"):
        if model_type in TASKS[task][1]:
            return task
    return "base"


def auto_compressed_class(task: str) -> type[_AutoCompressed]:
    """The ``AutoCompressed*`` factory for a task name (see ``TASKS``)."""
    for klass in _AutoCompressed.__subclasses__():
        if klass.task == task:
            return klass
    raise ValueError(f"hf_compress: unknown task {task!r}; choose from {sorted(TASKS)}.")


class _AutoCompressed:
    """``from_pretrained(dense_or_compressed, compression_config=...)``: load, then compress on load."""

    task: str = "base"

    def __init__(self) -> None:
        raise OSError(f"{type(self).__name__} is a factory: use {type(self).__name__}.from_pretrained(...).")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        compression_config: Any = None,
        calibration: Any = None,
        low_memory: bool | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load a dense or compressed checkpoint; if ``compression_config`` is given, compress it layer by layer.

        Without calibration (``low_memory=None``, the default, or ``True``) the dense model is never materialized:
        the model is built on the meta device and each target module's dense tensors are read from the
        safetensors file(s) just before it is compressed (see :mod:`hf_compress.streaming`). With calibration,
        ``low_memory=False`` or other loading kwargs (``device_map``, quantization…), the dense weights are loaded
        once into the compressed class, then each matched module is replaced and freed. Other kwargs go to
        ``PreTrainedModel.from_pretrained``.
        """
        from .compress import compress
        from .streaming import HUB_KWARGS, LOADER_KWARGS, low_memory_obstacle

        config = kwargs.pop("config", None)
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        if config is None:  # as transformers' Auto classes: config attributes given as kwargs (num_labels ...) set it
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
            for key in [k for k in kwargs if k not in LOADER_KWARGS and k not in hub and hasattr(config, k)]:
                setattr(config, key, kwargs.pop(key))
        config = to_compressed_config(config)
        model_class = cls._model_class(config)
        base = portable_base_model(pretrained_model_name_or_path)
        why_not = low_memory_obstacle(config, compression_config, calibration, kwargs)
        if low_memory and why_not:
            raise ValueError(f"hf_compress: low_memory=True is not possible here: {why_not}.")
        if low_memory is not False and not why_not:
            from .streaming import load_compressed_low_memory

            model = load_compressed_low_memory(model_class, pretrained_model_name_or_path, config, compression_config,
                                               dtype=kwargs.get("dtype"), hub=hub)
            if model is not None:
                model.config.compression_config.setdefault("base_model", base)
                return model
            if low_memory:
                raise ValueError("hf_compress: low_memory=True needs a safetensors checkpoint whose tensor names "
                                 "cover the model; pass low_memory=False.")
        model = model_class.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
        model, info = model if isinstance(model, tuple) else (model, None)  # output_loading_info=True
        model.config.compression_config = dict(model.config.compression_config or {})
        model.config.compression_config.setdefault("base_model", base)
        if compression_config is not None:
            compress(model, compression_config, calibration=calibration)
        return model if info is None else (model, info)

    @classmethod
    def from_config(cls, config: PretrainedConfig, compression_config: Any = None, **kwargs: Any) -> PreTrainedModel:
        """A randomly initialised model of ``config``'s architecture, compressed if a plan is given."""
        from .compress import compress

        config = to_compressed_config(config)
        model = cls._model_class(config)._from_config(config, **kwargs)
        if compression_config is not None:
            compress(model, compression_config)
        return model

    @classmethod
    def _model_class(cls, config: PretrainedConfig) -> type[PreTrainedModel]:
        auto_name, names = TASKS[cls.task]
        model_type = base_model_type(config)
        if model_type not in names:
            raise ValueError(
                f"hf_compress: {model_type!r} has no {auto_name} head in transformers; use another "
                f"AutoCompressed* class (tasks: {sorted(TASKS)})."
            )
        return _MODELS[getattr(transformers, names[model_type])]


class AutoCompressedModel(_AutoCompressed):
    """Base models and encoders (BERT/MiniLM, ``LlamaModel``, ``WhisperModel``…)."""

    task = "base"


class AutoCompressedModelForCausalLM(_AutoCompressed):
    task = "causal-lm"


class AutoCompressedModelForMaskedLM(_AutoCompressed):
    task = "masked-lm"


class AutoCompressedModelForSequenceClassification(_AutoCompressed):
    task = "sequence-classification"


class AutoCompressedModelForSpeechSeq2Seq(_AutoCompressed):
    task = "speech-seq2seq"


register_all()
