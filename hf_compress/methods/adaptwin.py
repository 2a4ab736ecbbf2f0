"""AdaPTwin product twins: compress each attention head's ``M_QK = W_Q W_Kᵀ`` and ``M_VO = W_V W_O`` jointly.

Per key/value group ``g`` (one head without GQA), with PyTorch ``[out, in]`` weights split per head
(``Q_h [d, hidden]``, ``K_g, V_g [d, kv_dim]``, ``O_h [hidden, d]``):

- scores ``x·M_QK·yᵀ`` with ``M_g = [Q_h1ᵀ; Q_h2ᵀ; …] K_g`` (the group's query heads stacked): truncated SVD
  ``U Σ Vᵀ``, new ``Q'_h = (U_h √Σ)ᵀ``, ``K'_g = (V √Σ)ᵀ`` (singular values shared). The query bias adds
  ``b_q^h·K_g·y`` to every score; it is kept *exactly*: ``u_h = K_gᵀ b_q^h`` is forced into the kept key subspace
  (basis ``[P, top r−p right singular vectors of M_g(I − PPᵀ)]``, the optimal rank-``r`` approximation under that
  constraint) and the new query bias solves ``K'_gᵀ b' = u_h``. A key bias adds a per-query constant to a score
  row, which softmax ignores: it is dropped (exact).
- values ``N_g = V_gᵀ [O_h1ᵀ | O_h2ᵀ | …]``: truncated SVD, ``V'_g = (U √Σ)ᵀ``, ``O'_h = W_h √Σ``. The value
  bias reaches the output as ``Σ_h O_h b_v^g`` (attention rows sum to one) and is folded into the output bias.

RoPE models (Llama, Mistral, Qwen2) rotate queries and keys between ``W_Q`` and ``W_K``, so ``W_Q R W_Kᵀ`` depends
on the relative position and a truncated ``M_QK`` is not the optimal (nor a rotation-consistent) approximation;
there only the VO twin is applied (``parts="auto"``), and asking for the QK twin is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compress import CompressionContext
from ..config import CalibrationRequiredError, MethodConfig, check_field_types
from ..layers.twin_attention import TwinAttention
from ..registry import register_method

_PARTS = ("auto", "qk_vo", "qk", "vo")
ROPE_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
_EPS = 1e-10


@dataclass
class ProductTwinConfig(MethodConfig):
    """Replace an attention module by :class:`TwinAttention` with per-head ranks ``r_qk``, ``r_vo`` < head_dim.

    Give exactly one size: ``rank`` (per head, both products), ``rank_ratio`` (fraction of ``head_dim``;
    ``1.0`` keeps full head rank and is exact) or ``energy`` (per layer and product, the smallest rank keeping
    that share of ``Σσ²`` for every head group); ``vo_rank`` optionally sets the VO rank apart. ``parts``:
    ``"auto"`` (QK and VO; VO only on RoPE models),
    ``"qk_vo"``, ``"qk"`` or ``"vo"``. ``whiten=True`` (needs ``compress(..., calibration=batches)``) truncates
    ``Lxᵀ M_QK Ly`` and ``Lyᵀ M_VO`` (``L Lᵀ`` = input covariance ``XᵀX/N``): the optimal rank for the expected
    score/output error on those inputs instead of the plain Frobenius norm. Targets: ``WhisperAttention``
    (encoder, decoder self- and cross-attention) and ``LlamaAttention``/``MistralAttention``/``Qwen2Attention``
    (GQA: each query head pairs with its KV head).
    """

    registry_name = "product_twin"

    rank: int | None = field(default=None, metadata={"help": "per-head rank r >= 1 of both products"})
    rank_ratio: float | None = field(default=None, metadata={"help": "rank as a fraction of head_dim, in (0, 1]"})
    energy: float | None = field(default=None, metadata={"help": "share of spectral energy kept, in (0, 1]"})
    parts: str = field(default="auto", metadata={"help": f"products to compress, one of {_PARTS}"})
    whiten: bool = field(default=False, metadata={"help": "truncate in the basis of calibration input covariances"})
    damping: float = field(default=0.01, metadata={"help": "whiten: ridge λ·mean(diag) added to XᵀX/N"})
    vo_rank: int | None = field(default=None, metadata={"help": "per-head VO rank overriding the size for M_VO "
                                                                "(M_VO is usually the more sensitive product)"})

    def __post_init__(self) -> None:
        check_field_types(self)
        sizes = [k for k in ("rank", "rank_ratio", "energy") if getattr(self, k) is not None]
        if len(sizes) != 1:
            raise ValueError("hf_compress: ProductTwinConfig needs exactly one of `rank`, `rank_ratio` or `energy`, "
                             f"got {sizes or 'none'}.")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"hf_compress: ProductTwinConfig.rank must be a positive int, got {self.rank!r}.")
        for key in ("rank_ratio", "energy"):
            value = getattr(self, key)
            if value is not None and not 0.0 < float(value) <= 1.0:
                raise ValueError(f"hf_compress: ProductTwinConfig.{key} must be in (0, 1], got {value!r}.")
        if self.vo_rank is not None and (not isinstance(self.vo_rank, int) or isinstance(self.vo_rank, bool)
                                         or self.vo_rank < 1):
            raise ValueError(f"hf_compress: ProductTwinConfig.vo_rank must be a positive int, got {self.vo_rank!r}.")
        if self.damping < 0:
            raise ValueError(f"hf_compress: ProductTwinConfig.damping must be >= 0, got {self.damping!r}.")
        if self.parts not in _PARTS:
            raise ValueError(f"hf_compress: ProductTwinConfig.parts must be one of {_PARTS}, got {self.parts!r}.")
        if self.vo_rank is not None and self.parts == "qk":
            raise ValueError("hf_compress: ProductTwinConfig.vo_rank sizes the VO twin, which parts='qk' leaves "
                             "dense; drop vo_rank or use parts='qk_vo'.")

    def rank_for(self, head_dim: int, spectra: list[torch.Tensor] | None = None) -> int:
        """Per-head rank for ``head_dim`` (``spectra``: singular values of each group's product, for ``energy``)."""
        if self.rank is not None:
            return self.rank
        if self.rank_ratio is not None:
            return max(1, math.floor(self.rank_ratio * head_dim + 1e-9))
        share = [(s**2).cumsum(0) / (s**2).sum().clamp_min(1e-300) for s in spectra or []]
        return max([int((c < self.energy - 1e-12).sum()) + 1 for c in share] or [head_dim])


def product_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``left [m, d] @ right [d, n]`` (``m, n >= d``) via two QRs: ``(U [m, d], S [d], Vt [d, n])``."""
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right.T)
    u, s, vt = torch.linalg.svd(r1 @ r2.T)
    return q1 @ u, s, vt @ q2.T


def _balanced(a: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewrite ``a [m, r] @ basis [n, r]ᵀ`` as ``A' B'ᵀ`` with ``√Σ`` on each side; also returns ``Wt``, ``root``."""
    u, s, wt = torch.linalg.svd(a, full_matrices=False)
    root = s.clamp_min(_EPS * float(s.max().clamp_min(_EPS))).sqrt()
    return u * (s / root), basis @ wt.T * root, wt, root


def qk_twin(q: torch.Tensor, k: torch.Tensor, q_bias: torch.Tensor | None, rank: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``q [H, d, hidden]``, ``k [Hkv, d, kv_dim]``, ``q_bias [H, d]`` -> ``(q' [H, r, hidden], k' [Hkv, r, kv_dim],
    q_bias' [H, r])``: the best rank-``r`` twin of each group's stacked ``M_QK`` that keeps ``b_q·K`` exact."""
    heads, _, hidden = q.shape
    groups = heads // k.shape[0]
    new_q, new_k = q.new_zeros(heads, rank, hidden), k.new_zeros(k.shape[0], rank, k.shape[2])
    new_b = None if q_bias is None else q.new_zeros(heads, rank)
    for g in range(k.shape[0]):
        hs = range(g * groups, (g + 1) * groups)
        stacked = torch.cat([q[h].T for h in hs])  # [G·hidden, d]
        kg = k[g]
        p_basis = kg.new_zeros(kg.shape[1], 0)
        if q_bias is not None:
            u_vec = kg.T @ q_bias[list(hs)].T  # [kv_dim, G]
            pu, ps, _ = torch.linalg.svd(u_vec, full_matrices=False)
            p_basis = pu[:, : int((ps > 1e-12 * float(ps.max().clamp_min(1e-300))).sum())]
            if p_basis.shape[1] > rank:
                raise ValueError(f"hf_compress: product_twin rank {rank} is below the {p_basis.shape[1]} dims needed "
                                 "to keep this group's query biases exact; use a rank >= the GQA group size.")
        residual = kg - (kg @ p_basis) @ p_basis.T
        _, _, vt = product_svd(stacked, residual)
        basis = torch.cat([p_basis, vt[: rank - p_basis.shape[1]].T], dim=1)  # [kv_dim, r], orthonormal
        a, b, wt, root = _balanced(stacked @ (kg @ basis), basis)
        for i, h in enumerate(hs):
            new_q[h] = a[i * hidden:(i + 1) * hidden].T
            if new_b is not None:
                new_b[h] = (wt @ (basis.T @ (kg.T @ q_bias[h]))) / root
        new_k[g] = b.T
    return new_q, new_k, new_b


def vo_twin(v: torch.Tensor, o: torch.Tensor, v_bias: torch.Tensor | None, o_bias: torch.Tensor | None, rank: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``v [Hkv, d, kv_dim]``, ``o [hidden, H, d]`` -> ``(v' [Hkv, r, kv_dim], o' [hidden, H, r], o_bias' [hidden])``:
    the best rank-``r`` twin of each group's ``N_g = V_gᵀ [O_h1ᵀ | …]``, value bias folded into the output bias."""
    heads, groups = o.shape[1], o.shape[1] // v.shape[0]
    new_v, new_o = v.new_zeros(v.shape[0], rank, v.shape[2]), o.new_zeros(o.shape[0], heads, rank)
    for g in range(v.shape[0]):
        hs = range(g * groups, (g + 1) * groups)
        u, s, vt = product_svd(v[g].T, torch.cat([o[:, h].T for h in hs], dim=1))
        root = s[:rank].sqrt()
        new_v[g] = (u[:, :rank] * root).T
        for i, h in enumerate(hs):
            new_o[:, h] = (root[:, None] * vt[:rank, i * o.shape[0]:(i + 1) * o.shape[0]]).T
    bias = o_bias
    if v_bias is not None:
        folded = torch.einsum("ohd,hd->o", o, v_bias.repeat_interleave(groups, dim=0))
        bias = folded if o_bias is None else o_bias + folded
    return new_v, new_o, bias


def prepare_product_twin(model: nn.Module, configs: dict[str, ProductTwinConfig], calibration: Any
                         ) -> dict[str, Any]:
    """Registry ``prepare`` hook: ``{name: {"lx", "ly"}}`` Cholesky factors of the q_proj / k_proj input covariances
    of every ``whiten=True`` target (one streamed calibration pass per chunk)."""
    from ..calibration import input_statistics_streamed
    from ..layers.lowrank import whitening

    names = [n for n, c in configs.items() if c.whiten]
    if not names:
        return {}
    if not calibration:
        raise CalibrationRequiredError(
            f"hf_compress: ProductTwinConfig(whiten=True) needs calibration batches for {names[0]}: call "
            "compress(model, plan, calibration=batches) with a few model-input dicts (Whisper: "
            "{'input_features', 'decoder_input_ids'}).")
    wanted = [f"{n}.{p}" for n in names for p in ("q_proj", "k_proj")]
    stats: dict[str, torch.Tensor] = {}
    for chunk, _ in input_statistics_streamed(model, wanted, calibration, stat="cov"):
        stats.update(chunk)
    return {n: {"lx": whitening(stats[f"{n}.q_proj"], configs[n].damping, n),
                "ly": whitening(stats[f"{n}.k_proj"], configs[n].damping, n)} for n in names}


def _describe(module: nn.Module, ctx: CompressionContext) -> dict[str, Any]:
    """TwinAttention constructor arguments (dense shapes) for a supported attention module."""
    kind = type(module).__name__
    if kind == "WhisperAttention":
        return {"embed_dim": module.embed_dim, "num_heads": module.num_heads, "num_kv_heads": module.num_heads,
                "scaling": module.scaling, "family": "whisper", "out_name": "out_proj", "rope": False,
                "is_causal": bool(module.is_causal), "is_decoder": bool(module.is_decoder),
                "layer_idx": module.layer_idx, "dropout": float(module.dropout)}
    if kind in ROPE_ATTENTION and not hasattr(module, "q_norm"):
        cfg = module.config
        return {"embed_dim": cfg.hidden_size, "num_heads": cfg.num_attention_heads,
                "num_kv_heads": cfg.num_key_value_heads, "scaling": module.scaling, "family": "llama",
                "out_name": "o_proj", "rope": True, "is_causal": True, "is_decoder": True,
                "layer_idx": module.layer_idx, "dropout": float(module.attention_dropout)}
    if hasattr(module, "q_norm"):
        raise TypeError(f"hf_compress: {ctx.name} is a {kind} with per-head q_norm/k_norm (Qwen3, Gemma 3): the norms "
                        "sit between W_Q and W_K, so ProductTwinConfig does not support it. Compress its projections "
                        "with LowRankConfig instead (e.g. r'self_attn\\.(q|k|v|o)_proj$').")
    raise TypeError(f"hf_compress: {ctx.name} is a {kind}; ProductTwinConfig compresses whole attention modules of "
                    f"type WhisperAttention or {', '.join(ROPE_ATTENTION)}. Point the pattern at the attention "
                    r"module (e.g. r'self_attn$'), not at its projections.")


def compress_product_twin(module: nn.Module, config: ProductTwinConfig, ctx: CompressionContext) -> TwinAttention:
    """Registry compress function: the :class:`TwinAttention` twin of one attention module."""
    args = _describe(module, ctx)
    out = getattr(module, args["out_name"])
    heads, kv_heads = args["num_heads"], args["num_kv_heads"]
    d = module.q_proj.weight.shape[0] // heads
    dtype = module.q_proj.weight.dtype
    parts = ("vo" if args["rope"] else "qk_vo") if config.parts == "auto" else config.parts
    if args["rope"] and "qk" in parts:
        raise ValueError(f"hf_compress: {ctx.name}: RoPE sits between W_Q and W_K, so the QK product twin does not "
                         "apply; use ProductTwinConfig(parts='vo') or parts='auto'.")

    def w(lin: nn.Linear, n: int) -> torch.Tensor:
        return lin.weight.detach().to(torch.float64).reshape(n, d, -1)

    def b(lin: nn.Linear) -> torch.Tensor | None:
        return None if lin.bias is None else lin.bias.detach().to(torch.float64)

    q, k, v = w(module.q_proj, heads), w(module.k_proj, kv_heads), w(module.v_proj, kv_heads)
    o = out.weight.detach().to(torch.float64).reshape(-1, heads, d)
    q_bias, k_bias, v_bias, o_bias = b(module.q_proj), b(module.k_proj), b(module.v_proj), b(out)
    groups = heads // kv_heads
    r_qk = r_vo = d
    lx = ly = None
    if config.whiten:
        if not isinstance(ctx.state, dict) or "ly" not in ctx.state:
            raise CalibrationRequiredError(f"hf_compress: {ctx.name}: ProductTwinConfig(whiten=True) has no "
                                           "calibration statistics; pass calibration=batches to compress().")
        lx, ly = ctx.state["lx"].to(q), ctx.state["ly"].to(q)
        q, k, v = q @ lx, k @ ly, v @ ly  # spectra (energy) are taken in the whitened basis too
    if "qk" not in parts and lx is not None:
        q, k = _unwhiten(q, lx), _unwhiten(k, ly)
    if "vo" not in parts and ly is not None:
        v = _unwhiten(v, ly)
    if "qk" in parts:
        spectra = None
        if config.energy is not None:
            spectra = [product_svd(torch.cat([q[h].T for h in range(g * groups, (g + 1) * groups)]), k[g])[1]
                       for g in range(kv_heads)]
        r_qk = _checked(config.rank_for(d, spectra), d, ctx.name)
        qb = None if q_bias is None else q_bias.reshape(heads, d)
        q, k, qb = qk_twin(q, k, qb, r_qk)
        if lx is not None:  # back from the whitened basis: Q' L⁻¹, K' L⁻¹ (the query bias is basis-free)
            q, k = _unwhiten(q, lx), _unwhiten(k, ly)
        q_bias, k_bias = None if qb is None else qb.reshape(-1), None  # key bias: softmax-invariant, dropped
    if "vo" in parts:
        spectra = None
        if config.energy is not None and config.vo_rank is None:
            spectra = [product_svd(v[g].T, torch.cat([o[:, h].T for h in range(g * groups, (g + 1) * groups)],
                                                     dim=1))[1] for g in range(kv_heads)]
        r_vo = _checked(config.vo_rank or config.rank_for(d, spectra), d, ctx.name)
        vb = None if v_bias is None else v_bias.reshape(kv_heads, d)
        v, o, o_bias = vo_twin(v, o, vb, o_bias, r_vo)
        if ly is not None:
            v = _unwhiten(v, ly)
        v_bias = None
    layer = TwinAttention(qk_rank=r_qk, vo_rank=r_vo, kv_dim=module.k_proj.weight.shape[1],
                          q_bias=q_bias is not None, k_bias=k_bias is not None, v_bias=v_bias is not None,
                          o_bias=o_bias is not None, device=module.q_proj.weight.device, dtype=dtype, **args)
    new_out = getattr(layer, args["out_name"])
    with torch.no_grad():
        for lin, weight, bias in ((layer.q_proj, q, q_bias), (layer.k_proj, k, k_bias), (layer.v_proj, v, v_bias),
                                  (new_out, o, o_bias)):
            lin.weight.copy_(weight.reshape(lin.weight.shape).to(dtype))
            if bias is not None:
                lin.bias.copy_(bias.to(dtype))
    layer.train(module.training)
    return layer


def _unwhiten(w: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``w [..., r, in] @ chol⁻¹`` for a lower-triangular ``chol [in, in]``."""
    return torch.linalg.solve_triangular(chol, w, upper=False, left=False)


def _checked(rank: int, head_dim: int, name: str) -> int:
    if rank > head_dim:
        raise ValueError(f"hf_compress: {name}: product_twin rank {rank} exceeds head_dim {head_dim}; "
                         f"use a rank <= {head_dim} (or rank_ratio <= 1).")
    return rank


def twin_param_count(embed_dim: int, kv_dim: int, heads: int, kv_heads: int, r_qk: int, r_vo: int) -> int:
    """Weight parameters (no biases) of a twin attention: ``(H·embed + Hkv·kv)·(r_qk + r_vo)``."""
    return (heads * embed_dim + kv_heads * kv_dim) * (r_qk + r_vo)


register_method("product_twin", ProductTwinConfig, compress_product_twin, prepare_product_twin)
