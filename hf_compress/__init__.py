"""hf_compress: compress pretrained transformers models while they stay ordinary Hugging Face models.

Importing the package registers the compressed config/model classes with transformers' Auto classes and lets
PEFT's LoRA wrap compressed layers (:func:`hf_compress.lora.enable_peft_dispatch`). Method configs and layers are
also package attributes (``hf_compress.TTEmbeddingConfig`` etc.); ``sweep``, ``plan`` and ``vocab`` are imported
on first access.
"""

from importlib import import_module
from typing import Any

from .compress import compress
from .config import BudgetError, CalibrationRequiredError, CompressionConfig, MethodConfig
from .layers import LowRankLinear
from .lora import enable_peft_dispatch
from .methods import LowRankConfig
from .modeling import (
    SUPPORTED_MODEL_TYPES,
    AutoCompressedModel,
    AutoCompressedModelForCausalLM,
    AutoCompressedModelForMaskedLM,
    AutoCompressedModelForSequenceClassification,
    AutoCompressedModelForSpeechSeq2Seq,
)
from .registry import available_methods, register_layer, register_method

enable_peft_dispatch()  # LoraConfig targets that are compressed layers need no per-config registration

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "TTEmbeddingConfig": ".methods.tt_embedding",
    "TTEmbedding": ".layers.tt_embedding",
    "SubspaceEmbeddingConfig": ".methods.subspace",
    "SubspaceEmbedding": ".layers.subspace",
    "CodebookConfig": ".methods.jlcm",
    "CodebookLinear": ".layers.codebook",
    "ProductTwinConfig": ".methods.adaptwin",
    "sweep": ".sweep",
    "plan": ".planning",
    "adapters": ".adapters",
    "lora": ".lora",
    "vocab": ".vocab",
    "healing": ".healing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = import_module(_LAZY[name], __name__)
        return module if name == module.__name__.rsplit(".", 1)[-1] else getattr(module, name)
    raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AutoCompressedModel",
    "AutoCompressedModelForCausalLM",
    "AutoCompressedModelForMaskedLM",
    "AutoCompressedModelForSequenceClassification",
    "AutoCompressedModelForSpeechSeq2Seq",
    "BudgetError",
    "CalibrationRequiredError",
    "CompressionConfig",
    "LowRankConfig",
    "LowRankLinear",
    "MethodConfig",
    "available_methods",
    "compress",
    "register_layer",
    "register_method",
    *_LAZY,
]
