"""The search space of :func:`hf_compress.plan`: module groups, candidate settings, byte and quality measures."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compress import compressed_layer_names, within
from .config import MethodConfig
from .methods.lowrank import LowRankConfig
from .registry import is_compressed_layer
from .sweep import _is_linear, output_error_fn, perplexity_fn

TWIN_ATTENTION = ("WhisperAttention", "LlamaAttention", "MistralAttention", "Qwen2Attention")
KINDS = ("embedding", "attention", "linear")


@dataclass
class Group:
    """Modules planned together: ``modules`` (names) are replaced by module-level methods through ``pattern``;
    for attention groups, linear methods act on the projections ``linears`` through ``linear_pattern``."""

    key: str
    kind: str
    modules: list[str]
    pattern: str
    linears: list[str] = field(default_factory=list)
    linear_pattern: str = ""


def model_bytes(model: nn.Module, float_bytes: int | None = 2) -> int:
    """Stored bytes of ``model``'s state (unique tensors; floating ones at ``float_bytes`` each if given)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        if t is None:
            continue
        key = (t.data_ptr(), t.numel()) if t.device.type != "meta" else (id(t), t.numel())
        if key in seen:
            continue
        seen.add(key)
        width = float_bytes if float_bytes and t.is_floating_point() else t.element_size()
        total += t.numel() * width
    return total


def sequence_nll_fn(batches: Sequence[dict[str, torch.Tensor]]) -> Callable[[nn.Module], float]:
    """``m -> exp(mean NLL)`` of ``decoder_input_ids[:, 1:]`` teacher-forced on ``{"input_features",
    "decoder_input_ids"}`` batches (a seq2seq perplexity of the transcripts)."""
    def fn(m: nn.Module) -> float:
        nll, count = 0.0, 0
        with torch.inference_mode():
            for b in batches:
                ids = b["decoder_input_ids"]
                logits = m(**b).logits[:, :-1].float()
                nll += float(nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
                count += ids[:, 1:].numel()
        return math.exp(nll / max(count, 1))
    return fn


def default_quality_fn(model: nn.Module, batches: Sequence[Any]) -> tuple[Callable[[nn.Module], float], str]:
    """Perplexity for token batches of a causal LM, transcript perplexity for seq2seq dict batches with
    ``decoder_input_ids``, else relative output error vs the dense model (captured now)."""
    first = batches[0]
    if isinstance(first, torch.Tensor) and hasattr(model, "generate") and model.can_generate():
        return perplexity_fn(batches), "ppl"
    if isinstance(first, Mapping) and "decoder_input_ids" in first and first["decoder_input_ids"].shape[1] > 1:
        return sequence_nll_fn(batches), "seq2seq_ppl"
    return output_error_fn(model, batches), "output_error"


# --------------------------------------------------------------------------------------------------- groups
def _template(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _regex(template: str) -> str:
    return re.escape(template).replace(r"\.\*", r"\.\d+").replace(r"\*", r"\d+")


def find_groups(model: nn.Module) -> dict[str, Group]:
    """Group key -> :class:`Group`: the input token embedding, whole attention modules of types product twins
    support, and every other linear layer by structural name (digits of layer indices folded); the output head is
    never a group (a tied head follows its embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    groups: dict[str, Group] = {}
    attn: dict[str, list[str]] = {}
    done = compressed_layer_names(model)
    for name, m in model.named_modules():
        if within(name, done):
            continue  # already compressed (its factors are plain linears, but not ours to compress again)
        if m is emb and isinstance(m, nn.Embedding):
            groups[name] = Group(name, "embedding", [name], re.escape(name))
        elif type(m).__name__ in TWIN_ATTENTION and not any(map(is_compressed_layer, m.modules())):
            attn.setdefault(_template(name), []).append(name)
    inside = {}
    for key, names in attn.items():
        linears = [f"{n}.{c}" for n in names for c, sub in model.get_submodule(n).named_modules()
                   if c and _is_linear(sub)]
        leaves = sorted({ln.rsplit(".", 1)[-1] for ln in linears})
        groups[key] = Group(key, "attention", names, _regex(key), linears,
                            rf"{_regex(key)}\.({'|'.join(map(re.escape, leaves))})")
        inside.update(dict.fromkeys(linears))
    by_template: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if _is_linear(m) and m is not head and name not in inside and not within(name, done):
            by_template.setdefault(_template(name), []).append(name)
    for key, names in by_template.items():
        groups[key] = Group(key, "linear", names, _regex(key), names, _regex(key))
    return groups


def default_candidates(kind: str, calibrated: bool = True) -> list[MethodConfig]:
    """Candidate settings per group kind (``embedding``, ``attention``, ``linear``); calibrated variants need
    calibration batches (``calibrated=False`` gives data-free ones). Calibrated codebooks are JLCM's k-means
    initialization + one GPTQ-style error-feedback mapping, without the joint steps (about 1 s per 1536x576 layer on a
    CPU); data-free ones are plain k-means. Pass ``CodebookConfig(method="jlcm", steps=...)`` in
    ``plan(candidates=...)`` for the full joint optimization."""
    from .methods.adaptwin import ProductTwinConfig
    from .methods.jlcm import CodebookConfig
    from .methods.tt_embedding import TTEmbeddingConfig

    lowrank = "whitened" if calibrated else "svd"
    codebook: dict[str, Any] = {"method": "kmeans", "kmeans_iters": 8}
    if calibrated:
        codebook.update(method="jlcm", steps=0, error_feedback=1)
    if kind == "embedding":  # calibrated codebooks weigh a tied head's input statistics (methods.jlcm_embedding)
        return [TTEmbeddingConfig(format="adaptive", compression=c) for c in (1.5, 2.0, 4.0)] + [
            CodebookConfig(bits=b, **codebook) for b in (6, 4)]
    linear = [LowRankConfig(method=lowrank, rank_ratio=0.5), CodebookConfig(bits=4, **codebook),
              CodebookConfig(bits=3, **codebook)]
    if kind == "attention":
        return [ProductTwinConfig(rank_ratio=r, whiten=calibrated) for r in (0.75, 0.5)] + linear
    if kind == "linear":
        return [LowRankConfig(method=lowrank, rank_ratio=0.75), *linear]
    raise ValueError(f"hf_compress.plan: unknown group kind {kind!r}; one of {KINDS}.")


def label(cfg: MethodConfig) -> str:
    """Short readable name of a candidate, e.g. ``low_rank:whitened:0.5`` or ``jlcm:4b``."""
    d = cfg.to_dict()
    if d["type"] == "low_rank":
        return f"low_rank:{d['method']}:{d['rank_ratio'] or d['rank'] or d['energy']}"
    if d["type"] == "jlcm":
        return f"jlcm:{d['method']}:{d['bits']}b" + (f"/d{d['vector_dim']}" if d["vector_dim"] > 1 else "")
    if d["type"] == "product_twin":
        return f"product_twin:{d['rank_ratio'] or d['rank'] or d['energy']}" + (":whiten" if d["whiten"] else "")
    if d["type"] == "tt_embedding":
        return f"tt_embedding:{d['format']}:x{d['compression'] or d['ranks'] or d['eps']}"
    if d["type"] == "subspace_embedding":
        return f"subspace:f{d['num_subspaces']}:{d['assignment']}:{d['num_rows'] or d['param_fraction']}"
    return d["type"]


def target(group: Group, cfg: MethodConfig) -> tuple[str, list[str]] | None:
    """``(pattern, module names)`` a candidate acts on in ``group``; ``None`` if the method does not apply."""
    module_level = cfg.registry_name in ("tt_embedding", "subspace_embedding", "product_twin")
    if group.kind == "embedding":
        return (group.pattern, group.modules) if cfg.registry_name in ("tt_embedding", "subspace_embedding", "jlcm") \
            else None
    if module_level:
        return (group.pattern, group.modules) if group.kind == "attention" and cfg.registry_name == "product_twin" \
            else None
    return group.linear_pattern, group.linears
