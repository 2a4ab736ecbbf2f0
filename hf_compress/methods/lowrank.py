"""Low-rank decomposition of linear layers without retraining: plain truncated SVD, activation-aware SVD
(SVD-LLM truncation-aware whitening, ASVD-style scaling) and Tucker decomposition of attention projections.

Activation-aware methods need calibration batches: ``compress(model, plan, calibration=batches)``. Their
``prepare`` hook streams the calibration in chunks of layers (one forward pass per chunk, at most
``CALIBRATION_CHUNK_BYTES`` of statistics alive), factors each layer as soon as its chunk is measured and keeps
only the truncated factors; :data:`CALIBRATION_REPORT` holds the last pass's passes, tokens and peak bytes.
With ``sequential=True`` each block's statistics are measured on the model whose earlier blocks are already
low-rank (as GPTQ does; :func:`hf_compress.compress.compress` runs one truncated pass per block), so a layer's
truncation also answers for the error its inputs already carry.
"""

from __future__ import annotations

import itertools
import math
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compress import CompressionContext
from ..config import CalibrationRequiredError, MethodConfig, check_field_types
from ..layers.common import linear_weight_and_bias
from ..layers.lowrank import LowRankLinear, Spectrum, spectrum
from ..layers.tucker import TuckerLinear, tucker_params
from ..registry import register_method

_METHODS = ("svd", "whitened", "asvd", "tucker")
_CALIBRATED = {"whitened": "cov", "asvd": "abs_mean"}
_ALLOCATIONS = ("uniform", "global")
ATTENTION_NAME = re.compile(r"attn|attention")
HEADS_ON_INPUT = re.compile(r"(o_proj|out_proj|c_proj|output\.dense)$")  # attention output projections
CALIBRATION_CHUNK_BYTES = 256 * 2**20
CALIBRATION_REPORT: dict[str, Any] = {}


@dataclass
class LowRankConfig(MethodConfig):
    """Replace ``nn.Linear``/``Conv1D`` weights ``W [out, in]`` by a low-rank form.

    ``method``: ``"svd"`` (truncated SVD), ``"whitened"`` (SVD of ``W·S`` with ``S Sᵀ = XᵀX/N`` from calibration
    inputs: optimal rank-``r`` output error on those inputs), ``"asvd"`` (SVD of ``W·diag(mean|x|^alpha)``) or
    ``"tucker"`` (attention projections as ``[heads, head_dim, hidden]`` tensors, :class:`TuckerLinear`).

    Give exactly one size: ``rank`` (absolute; not for tucker), ``rank_ratio`` (fraction of the layer's parameters
    kept; for SVD methods ``r = floor(rank_ratio · out·in / (out + in))``), ``energy`` (smallest size keeping that
    share of ``Σσ²`` of the (transformed) weight) or, for tucker, ``tucker_ranks = [heads, head_dim, hidden]``.
    Layers where the factors would not be smaller than the dense weight are left dense, with a warning.
    """

    registry_name = "low_rank"

    rank: int | None = field(default=None, metadata={"help": "absolute rank r >= 1"})
    rank_ratio: float | None = field(default=None, metadata={"help": "fraction of parameters kept, in (0, 1]"})
    method: str = field(default="svd", metadata={"help": f"decomposition, one of {_METHODS}"})
    energy: float | None = field(default=None, metadata={"help": "share of spectral energy kept, in (0, 1]"})
    tucker_ranks: list[int] | None = field(default=None, metadata={"help": "tucker: [heads, head_dim, hidden] ranks"})
    alpha: float = field(default=0.5, metadata={"help": "asvd: exponent of the mean |activation| scaling"})
    damping: float = field(default=0.0, metadata={"help": "whitened: ridge λ·mean(diag) added to XᵀX/N"})
    head_dim: int | None = field(default=None, metadata={"help": "tucker: head size (default: the model config's)"})
    allocation: str = field(default="uniform", metadata={"help": f"one of {_ALLOCATIONS}: 'global' reads rank_ratio "
                                                                 "as the share kept over all such targets together"})
    sequential: bool = field(default=False, metadata={"help": "whitened/asvd: measure each block's activations on the "
                                                              "model whose earlier blocks are already compressed "
                                                              "(one truncated calibration pass per block)"})

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.method not in _METHODS:
            raise ValueError(f"hf_compress: LowRankConfig.method must be one of {_METHODS}, got {self.method!r}.")
        sizes = [k for k in ("rank", "rank_ratio", "energy", "tucker_ranks") if getattr(self, k) is not None]
        if len(sizes) != 1:
            raise ValueError("hf_compress: LowRankConfig needs exactly one of `rank` or `rank_ratio` (or `energy`; "
                             f"`tucker_ranks` for method='tucker'), got {sizes or 'none'}.")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"hf_compress: LowRankConfig.rank must be a positive int, got {self.rank!r}.")
        if self.rank_ratio is not None and not 0.0 < float(self.rank_ratio) <= 1.0:
            raise ValueError(f"hf_compress: LowRankConfig.rank_ratio must be in (0, 1], got {self.rank_ratio!r}.")
        if self.energy is not None and not 0.0 < float(self.energy) <= 1.0:
            raise ValueError(f"hf_compress: LowRankConfig.energy must be in (0, 1], got {self.energy!r}.")
        if self.method == "tucker" and self.rank is not None:
            raise ValueError("hf_compress: LowRankConfig(method='tucker') takes tucker_ranks=[heads, head_dim, "
                             "hidden], rank_ratio or energy, not rank.")
        if self.tucker_ranks is not None:
            if self.method != "tucker":
                raise ValueError("hf_compress: LowRankConfig.tucker_ranks needs method='tucker'.")
            if len(self.tucker_ranks) != 3 or not all(isinstance(r, int) and r >= 1 for r in self.tucker_ranks):
                raise ValueError("hf_compress: LowRankConfig.tucker_ranks must be 3 positive ints [heads, head_dim, "
                                 f"hidden], got {self.tucker_ranks!r}.")
            self.tucker_ranks = list(self.tucker_ranks)
        if self.damping < 0 or self.alpha < 0:
            raise ValueError("hf_compress: LowRankConfig.damping and .alpha must be >= 0.")
        if self.allocation not in _ALLOCATIONS:
            raise ValueError(f"hf_compress: LowRankConfig.allocation must be one of {_ALLOCATIONS}, "
                             f"got {self.allocation!r}.")
        if self.allocation == "global" and (self.rank_ratio is None or self.method == "tucker"):
            raise ValueError("hf_compress: LowRankConfig(allocation='global') needs rank_ratio (the share of the "
                             "targets' parameters kept) and an SVD method ('svd', 'whitened' or 'asvd').")
        if self.sequential and (self.method not in _CALIBRATED or self.allocation == "global"):
            raise ValueError(f"hf_compress: LowRankConfig(sequential=True) applies to the calibrated methods "
                             f"{tuple(_CALIBRATED)} with allocation='uniform' (global allocation needs every "
                             f"layer's spectrum at once); got method={self.method!r}, "
                             f"allocation={self.allocation!r}.")

    @property
    def reads_activations(self) -> bool:
        """Whether the method needs calibration batches (the activation-aware ``whitened`` / ``asvd``)."""
        return self.method in _CALIBRATED

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The rank this config gives a ``[out_features, in_features]`` weight (``rank`` / ``rank_ratio`` only)."""
        if self.rank is not None:
            return self.rank
        if self.rank_ratio is None:
            raise ValueError("hf_compress: LowRankConfig.rank_for needs rank or rank_ratio; energy needs a spectrum.")
        return max(1, math.floor(self.rank_ratio * out_features * in_features / (out_features + in_features)))


def resolve_rank(name: str, config: LowRankConfig, out_features: int, in_features: int,
                 spec: Spectrum | None = None) -> int | None:
    """The rank for one layer, or ``None`` (with a warning) when its factors would not be smaller than dense."""
    rank = spec.rank_for_energy(config.energy) if config.energy is not None else config.rank_for(out_features,
                                                                                                in_features)
    if rank * (out_features + in_features) >= out_features * in_features:
        if rank > min(out_features, in_features):
            raise ValueError(
                f"hf_compress: {name}: rank {rank} exceeds min(in_features, out_features) = "
                f"{min(out_features, in_features)}. Use a rank <= {min(out_features, in_features)}."
            )
        warnings.warn(
            f"hf_compress: {name}: rank {rank} factors ({rank * (out_features + in_features)} params) are not "
            f"smaller than the dense weight ({out_features * in_features}); left dense.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return rank


def layer_spectrum(module: nn.Module, config: LowRankConfig, stat: Any, name: str) -> Spectrum:
    """Full :class:`Spectrum` of one layer for ``config.method`` given its calibration statistic (or ``None``)."""
    weight, _ = linear_weight_and_bias(module, name)
    if config.method == "whitened":
        return spectrum(weight, cov=stat, damping=config.damping, who=name)
    if config.method == "asvd":
        return spectrum(weight, abs_mean=stat, alpha=config.alpha)
    return spectrum(weight)


def calibration_statistics(model: nn.Module, configs: dict[str, LowRankConfig], calibration: Any,
                           max_bytes: int | None = None) -> Any:
    """Yield ``(name, statistic)`` for every activation-aware target, streamed chunk by chunk (see calibration)."""
    from ..calibration import input_statistics_streamed

    needs = {n: c for n, c in configs.items() if c.method in _CALIBRATED}
    if needs and not calibration:
        methods = sorted({c.method for c in needs.values()})
        raise CalibrationRequiredError(f"hf_compress: LowRankConfig(method={methods[0]!r}) needs calibration "
                                       f"batches for {next(iter(needs))}: call compress(model, plan, "
                                       "calibration=batches) with a few [1, seq] token-id tensors (or dicts of model "
                                       "inputs).")
    report = {"passes": 0, "peak_stat_bytes": 0, "modules": len(needs), "seconds": 0.0,
              "tokens": _count_tokens(calibration) if needs else 0}
    start = time.perf_counter()
    for kind in sorted(set(_CALIBRATED[c.method] for c in needs.values())):
        names = [n for n, c in needs.items() if _CALIBRATED[c.method] == kind]
        for stats, info in input_statistics_streamed(model, names, calibration, stat=kind,
                                                             max_bytes=max_bytes or CALIBRATION_CHUNK_BYTES):
            report["passes"] += 1
            report["peak_stat_bytes"] = max(report["peak_stat_bytes"], info["stat_bytes"])
            for name in list(stats):
                yield name, stats.pop(name)
    report["seconds"] = round(time.perf_counter() - start, 2)
    if needs:
        CALIBRATION_REPORT.clear()
        CALIBRATION_REPORT.update(report)


def _count_tokens(batches: Any) -> int:
    total = 0
    for b in batches:
        x = b if not isinstance(b, Mapping) else next(iter(v for v in b.values() if hasattr(v, "numel")), None)
        total += int(x.numel()) if x is not None else 0
    return total


def allocate_ranks(spectra: dict[str, tuple[torch.Tensor, int, int]], keep: int,
                   energy: dict[str, float] | None = None) -> dict[str, int]:
    """Global rank allocation: ``spectra`` maps a layer to ``(s [k] descending, out, in)``; returns ranks (>= 1,
    each below the size where factors stop saving) with ``Σ r·(out+in) <= keep`` (at least one rank each) that
    greedily minimize the summed *relative* truncation error ``Σ_l Σ_{i>r_l} s_i² / Σ s²``: singular directions
    are kept in order of relative energy per parameter, ``s_i² / (Σ s² · (out + in))``. ``energy``: each layer's
    full ``Σ s²`` when the given ``s`` are truncated."""
    names, gains, owners = list(spectra), [], []
    for idx, name in enumerate(names):
        s, out, inn = spectra[name]
        cap = max(1, min(s.numel(), (out * inn - 1) // (out + inn)))
        e = s[:cap].double() ** 2
        total = energy[name] if energy and name in energy else float((s.double() ** 2).sum())
        gains.append(e[1:] / max(total, 1e-300) / (out + inn))
        owners.append(torch.full((cap - 1,), idx))
    ranks = dict.fromkeys(names, 1)
    spent = sum(out + inn for _, out, inn in spectra.values())
    if not names or spent >= keep:
        return ranks
    gain, owner = torch.cat(gains), torch.cat(owners)
    cost = torch.tensor([spectra[n][1] + spectra[n][2] for n in names], dtype=torch.float64)[owner]
    order = gain.argsort(descending=True)  # within a layer gains fall, so every layer keeps a prefix
    taken = order[(cost[order].cumsum(0) <= keep - spent)]
    for idx, count in zip(*owner[taken].unique(return_counts=True), strict=True):
        ranks[names[int(idx)]] += int(count)
    return ranks


def prepare_low_rank(model: nn.Module, configs: dict[str, LowRankConfig], calibration: Any) -> dict[str, Any]:
    """Registry ``prepare`` hook: per activation-aware module ``{"spectrum": truncated Spectrum, "rank": r}``
    (``rank`` is ``None`` when the layer stays dense). ``allocation="global"`` targets (SVD too) get their ranks
    from :func:`allocate_ranks` over all of them; other SVD and Tucker targets need no state."""
    states: dict[str, Any] = {}
    pending: dict[str, Spectrum] = {}
    glob = {n: c for n, c in configs.items() if c.allocation == "global"}
    plain = [(n, None) for n, c in glob.items() if c.method not in _CALIBRATED]
    for name, stat in itertools.chain(calibration_statistics(model, configs, calibration), plain):
        module, config = model.get_submodule(name), configs[name]
        spec = layer_spectrum(module, config, stat, name)
        if name in glob:
            pending[name] = spec
            continue
        weight, _ = linear_weight_and_bias(module, name)
        rank = resolve_rank(name, config, *weight.shape, spec)
        states[name] = {"spectrum": None if rank is None else spec.truncate(rank), "rank": rank}
    if pending:
        shapes = {n: (spec.s, spec.u.shape[0], spec.vt.shape[1]) for n, spec in pending.items()}
        keep = sum(math.floor(glob[n].rank_ratio * out * inn) for n, (_, out, inn) in shapes.items())
        for name, rank in allocate_ranks(shapes, keep).items():
            states[name] = {"spectrum": pending.pop(name).truncate(rank), "rank": rank}
    return states


def compress_low_rank(module: nn.Module, config: LowRankConfig, ctx: CompressionContext) -> nn.Module | None:
    if config.method == "tucker":
        return compress_tucker(module, config, ctx)
    weight, bias = linear_weight_and_bias(module, ctx.name)
    if config.method in _CALIBRATED or config.allocation == "global":
        if not isinstance(ctx.state, dict) or "spectrum" not in ctx.state:
            raise CalibrationRequiredError(f"hf_compress: {ctx.name}: LowRankConfig(method={config.method!r}) has no "
                                           "calibration statistics; pass calibration=batches to compress().")
        spec, rank = ctx.state["spectrum"], ctx.state.get("rank")
        if spec is None:
            return None
        if rank is None:  # a full spectrum (e.g. from the sweep): resolve the rank from the config here
            rank = resolve_rank(ctx.name, config, *weight.shape, spec)
            if rank is None:
                return None
        return LowRankLinear.from_spectrum(spec, rank, bias, weight.dtype)
    spec = spectrum(weight) if config.energy is not None else None
    rank = resolve_rank(ctx.name, config, *weight.shape, spec)
    if rank is None:
        return None
    return LowRankLinear.from_spectrum(spec, rank, bias, weight.dtype) if spec else LowRankLinear.from_dense(module,
                                                                                                             rank)


def model_head_dim(model: nn.Module, name: str) -> int:
    """Attention head size from the model config (``head_dim`` or ``hidden_size / num_attention_heads``)."""
    cfg = getattr(model, "config", None)
    head_dim = getattr(cfg, "head_dim", None)
    if not head_dim and cfg is not None and getattr(cfg, "num_attention_heads", None):
        head_dim = cfg.hidden_size // cfg.num_attention_heads
    if not head_dim:
        raise ValueError(f"hf_compress: {name}: cannot tell the attention head size from the model config; "
                         "pass LowRankConfig(method='tucker', head_dim=...).")
    return int(head_dim)


def compress_tucker(module: nn.Module, config: LowRankConfig, ctx: CompressionContext) -> nn.Module | None:
    """Tucker-decompose one attention projection (heads split from the output, or the input of o_proj & co)."""
    weight, _ = linear_weight_and_bias(module, ctx.name)
    if not ATTENTION_NAME.search(ctx.name):
        raise ValueError(f"hf_compress: {ctx.name}: method='tucker' decomposes attention projections only (module "
                         "names containing 'attn'/'attention'); use method='svd' or 'whitened' for this layer.")
    head_dim = config.head_dim or model_head_dim(ctx.model, ctx.name)
    heads_on = "in" if HEADS_ON_INPUT.search(ctx.name) else "out"
    dense = weight.shape[0] * weight.shape[1]
    ranks = tuple(config.tucker_ranks) if config.tucker_ranks else None
    max_params = math.floor(config.rank_ratio * dense) if config.rank_ratio is not None else None
    layer = TuckerLinear.from_dense(module, head_dim, heads_on, ranks=ranks, max_params=max_params,
                                    energy=config.energy)
    n = tucker_params(layer.shape, layer.ranks)
    if n >= dense:
        warnings.warn(f"hf_compress: {ctx.name}: Tucker ranks {list(layer.ranks)} ({n} params) are not smaller than "
                      f"the dense weight ({dense}); left dense.", UserWarning, stacklevel=3)
        return None
    return layer


register_method("low_rank", LowRankConfig, compress_low_rank, prepare_low_rank)
