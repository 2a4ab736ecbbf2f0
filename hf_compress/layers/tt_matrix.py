"""Two more compressed token-embedding formats beside the paper's per-token TT.

* :class:`TTMatrixEmbedding` — a TT-matrix (TT-Rec / tltorch BlockTT): both the vocabulary (``V ≤ ∏ v_k``) and the
  hidden axis (``d = ∏ n_k``) are tensorized, cores ``[r_{k-1}, v_k, n_k, r_k]`` shared by all tokens.
* :class:`AdaptiveRankEmbedding` — a two-core TT of the ``[V, d]`` table whose leading (vocabulary) core has a
  per-token rank: ``w_v = c_v[:R_t] @ basis[:R_t]`` with ``basis [R_max, d]`` shared and the coefficient length
  ``R_t`` set by the token's tier (frequent / high-energy tokens get more rank). One tier = truncated SVD.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..registry import register_layer
from .common import content_key, reusable
from .tt_embedding import CompressedEmbedding, check_tt_shape_ranks


@register_layer
class TTMatrixEmbedding(CompressedEmbedding):
    """TT-matrix embedding: ``W[(i_1..i_N), (j_1..j_N)] = G_1[i_1, j_1] ⋯ G_N[i_N, j_N]``.

    Cores ``G_k [r_{k-1}, v_k, n_k, r_k]``.

    ``row_index [V]`` (persistent buffer) maps token ids to rows of the padded ``∏ v_k`` index space, so pruning
    tokens only rewrites the index.
    """

    layer_type = "tt_matrix_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_shape: list[int], shape: list[int],
                 ranks: list[int], padding_idx: int | None = None, embed_scale: float | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(embedding_dim, padding_idx, embed_scale)
        vocab_shape, shape, ranks = [int(v) for v in vocab_shape], [int(n) for n in shape], [int(r) for r in ranks]
        who = f"TTMatrixEmbedding({num_embeddings}x{embedding_dim})"
        if len(vocab_shape) != len(shape):
            raise ValueError(f"hf_compress: {who}: vocab_shape {vocab_shape} and shape {shape} need the same length.")
        if math.prod(vocab_shape) < num_embeddings:
            raise ValueError(f"hf_compress: {who}: vocab_shape {vocab_shape} has product {math.prod(vocab_shape)} < "
                             f"vocabulary size {num_embeddings}; give factors whose product is >= {num_embeddings}.")
        modes = [v * n for v, n in zip(vocab_shape, shape)]
        check_tt_shape_ranks(math.prod(modes), modes, ranks, who)
        if math.prod(shape) != embedding_dim:
            check_tt_shape_ranks(embedding_dim, shape, [1] * (len(shape) - 1), who)
        self.num_embeddings, self.vocab_shape, self.shape, self.ranks = num_embeddings, vocab_shape, shape, ranks
        full = [1, *ranks, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full[k], v, n, full[k + 1], device=device, dtype=dtype))
            for k, (v, n) in enumerate(zip(vocab_shape, shape))
        )
        self.register_buffer("row_index", torch.arange(num_embeddings, device=device))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, vocab_shape: list[int], shape: list[int], ranks: list[int],
                   **kwargs: Any) -> TTMatrixEmbedding:
        """TT-SVD of the zero-padded table reshaped to ``[v_1 n_1, …, v_N n_N]``."""
        from ..methods.tt_embedding import tt_svd_rows
        from .tt_embedding import check_tt_shape_ranks

        if weight.ndim != 2 or len(vocab_shape) != len(shape) or any(int(v) < 1 for v in vocab_shape) or \
                math.prod(vocab_shape) < weight.shape[0]:
            raise ValueError(f"hf_compress: TTMatrixEmbedding.from_dense needs a [V, d] weight and vocab_shape with "
                             f"one factor per hidden factor of {list(shape)} whose product covers V; got weight "
                             f"{list(weight.shape)}, vocab_shape {list(vocab_shape)}.")
        check_tt_shape_ranks(weight.shape[1], shape, [1] * (len(shape) - 1), "TTMatrixEmbedding.from_dense")
        modes = [v * m for v, m in zip(vocab_shape, shape)]
        check_tt_shape_ranks(math.prod(modes), modes, ranks, "TTMatrixEmbedding.from_dense")
        v_total, d = math.prod(vocab_shape), weight.shape[1]
        padded = weight.new_zeros(v_total, d)
        padded[: weight.shape[0]] = weight.detach()
        n = len(shape)
        t = padded.reshape(*vocab_shape, *shape).permute(*[p for k in range(n) for p in (k, n + k)])
        layer = cls(weight.shape[0], d, vocab_shape, shape, ranks, device=weight.device, dtype=weight.dtype, **kwargs)
        cores = tt_svd_rows(t.reshape(1, -1), modes, ranks=ranks)
        with torch.no_grad():
            for p, c in zip(layer.cores, cores):
                p.copy_(c[0].reshape(p.shape))
        return layer

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        idx = self.row_index[ids]
        strides = [math.prod(self.vocab_shape[k + 1:]) for k in range(len(self.vocab_shape))]
        digits = [(idx // s) % v for s, v in zip(strides, self.vocab_shape)]
        b = idx.shape[0]
        first = self.cores[0][0]  # [v_1, n_1, r_1]
        out = first[digits[0]]  # [B, n_1, r_1]
        for k in range(1, len(self.cores)):
            core = self.cores[k]  # [r_{k-1}, v_k, n_k, r_k]
            r_prev, _, n, r = core.shape
            nxt = out.new_empty(b, out.shape[1] * n, r)
            for j in torch.unique(digits[k]).tolist():  # group tokens by digit: plain matmuls, no gathered copies
                sel = (digits[k] == j).nonzero().squeeze(1)
                nxt[sel] = (out[sel] @ core[:, j].reshape(r_prev, n * r)).reshape(sel.numel(), -1, r).to(nxt.dtype)
            out = nxt
        return out.reshape(b, out.shape[1] * out.shape[2])

    def keep_rows(self, ids: torch.Tensor) -> None:
        self.row_index = self.row_index[ids.to(self.row_index.device)].contiguous()
        self.num_embeddings = int(ids.numel())

    def spec(self) -> dict[str, Any]:
        return {**self._base_spec(), "vocab_shape": list(self.vocab_shape), "shape": list(self.shape),
                "ranks": list(self.ranks)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TTMatrixEmbedding:
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["vocab_shape"], spec["shape"], spec["ranks"],
                   padding_idx=spec.get("padding_idx"), embed_scale=spec.get("embed_scale"))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab_shape={self.vocab_shape}, shape={self.shape}, "
                f"ranks={self.ranks}")


@register_layer
class AdaptiveRankEmbedding(CompressedEmbedding):
    """Per-token-rank two-core TT: token ``v`` in tier ``t`` is ``coeffs[t][slot[v]] @ basis[:R_t]``.

    Shapes: ``basis [R_max, d]``, ``coeffs[t] [n_t, R_t]`` (``R_0 ≥ R_1 ≥ …``), buffers ``tier [V]``, ``slot [V]``
    (int32, persistent). ``tier_ranks = [R]`` with one tier is a rank-``R`` truncated SVD of the table.
    """

    layer_type = "adaptive_rank_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, tier_ranks: list[int], tier_sizes: list[int],
                 padding_idx: int | None = None, embed_scale: float | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(embedding_dim, padding_idx, embed_scale)
        tier_ranks, tier_sizes = [int(r) for r in tier_ranks], [int(n) for n in tier_sizes]
        who = f"AdaptiveRankEmbedding({num_embeddings}x{embedding_dim})"
        if not tier_ranks or len(tier_ranks) != len(tier_sizes) or sum(tier_sizes) != num_embeddings:
            raise ValueError(f"hf_compress: {who}: tier_sizes {tier_sizes} must have one entry per tier rank "
                             f"{tier_ranks} and sum to {num_embeddings}.")
        if any(r < 1 or r > embedding_dim for r in tier_ranks):
            raise ValueError(f"hf_compress: {who}: every tier rank must be in [1, {embedding_dim}], got {tier_ranks}.")
        self.num_embeddings, self.tier_ranks, self.tier_sizes = num_embeddings, tier_ranks, tier_sizes
        self.basis = nn.Parameter(torch.empty(max(tier_ranks), embedding_dim, device=device, dtype=dtype))
        self.coeffs = nn.ParameterList(nn.Parameter(torch.empty(n, r, device=device, dtype=dtype))
                                       for n, r in zip(tier_sizes, tier_ranks))
        tier = torch.cat([torch.full((n,), t, dtype=torch.int32, device=device) for t, n in enumerate(tier_sizes)])
        slot = torch.cat([torch.arange(n, dtype=torch.int32, device=device) for n in tier_sizes])
        self.register_buffer("tier", tier)
        self.register_buffer("slot", slot)

    @classmethod
    def from_factors(cls, basis: torch.Tensor, coeffs: list[torch.Tensor], tier: torch.Tensor, slot: torch.Tensor,
                     **kwargs: Any) -> AdaptiveRankEmbedding:
        """Build from ``basis [R_max, d]``, ``coeffs[t] [n_t, R_t]`` and the per-token ``tier``/``slot`` maps."""
        layer = cls(int(tier.numel()), basis.shape[1], [c.shape[1] for c in coeffs], [c.shape[0] for c in coeffs],
                    device=basis.device, dtype=basis.dtype, **kwargs)
        with torch.no_grad():
            layer.basis.copy_(basis)
            for p, c in zip(layer.coeffs, coeffs):
                p.copy_(c)
            layer.tier.copy_(tier)
            layer.slot.copy_(slot)
        return layer

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        slots = self.slot[ids].long()
        if len(self.coeffs) == 1:
            return self.coeffs[0][slots] @ self.basis
        tiers = self.tier[ids]
        out = self.basis.new_zeros(ids.shape[0], self.embedding_dim)
        for t, (coeff, r) in enumerate(zip(self.coeffs, self.tier_ranks)):
            sel = (tiers == t).nonzero().squeeze(1)
            if sel.numel():
                out[sel] = (coeff[slots[sel]] @ self.basis[:r]).to(out.dtype)  # autocast may compute in bf16
        return out

    def _order(self) -> torch.Tensor:
        """``[V]`` position of each token in the tier-concatenated logits (cached per tier layout)."""
        key = (content_key(self.tier), content_key(self.slot), self.num_embeddings, tuple(self.tier_sizes))
        cached = self.__dict__.get("_order_cache")
        if cached is None or cached[0] != key or not reusable(cached[1]):
            offsets = torch.tensor([0, *self.tier_sizes[:-1]], device=self.tier.device).cumsum(0)
            cached = (key, offsets[self.tier.long()] + self.slot.long())
            self.__dict__["_order_cache"] = cached
        return cached[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., d]`` -> ``[..., V]`` without materializing the table: ``(h Bᵀ)[:R_t] C_tᵀ`` per tier."""
        z = hidden @ self.basis.to(hidden.dtype).T  # [..., R_max]
        parts = [z[..., :r] @ c.to(hidden.dtype).T for c, r in zip(self.coeffs, self.tier_ranks)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if len(parts) == 1 and self._identity():
            return out
        return out[..., self._order()]

    def _identity(self) -> bool:
        cached = self.__dict__.get("_identity_cache")
        key = (content_key(self.slot), self.num_embeddings)
        if cached is None or cached[0] != key:
            cached = (key, bool(torch.equal(self.slot.long(), torch.arange(self.num_embeddings,
                                                                           device=self.slot.device))))
            self.__dict__["_identity_cache"] = cached
        return cached[1]

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients ``[m, R_max]`` of ``vectors [m, d]`` on the basis."""
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding_dim:
            raise ValueError(f"hf_compress: AdaptiveRankEmbedding: token vectors must be [m, {self.embedding_dim}], "
                             f"got {list(vectors.shape)}.")
        basis = self.basis.detach().double()
        sol = torch.linalg.lstsq(basis.T, vectors.detach().to(basis).T).solution  # [R_max, m]
        return sol.T.to(self.basis.dtype)

    def add_rows(self, vectors: torch.Tensor, tier: int = 0) -> None:
        """Append ``vectors [m, d]`` as new tokens in ``tier`` (default: the highest-rank tier)."""
        coeff = self.project(vectors)[:, : self.tier_ranks[tier]]
        start = self.tier_sizes[tier]
        self.coeffs[tier].data = torch.cat([self.coeffs[tier].data, coeff])
        m = coeff.shape[0]
        self.tier = torch.cat([self.tier, self.tier.new_full((m,), tier)])
        self.slot = torch.cat([self.slot, torch.arange(start, start + m, dtype=self.slot.dtype,
                                                       device=self.slot.device)])
        self.tier_sizes[tier] += m
        self.num_embeddings += m

    def set_rows(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        coeff = self.project(vectors)
        with torch.no_grad():
            for i, tok in enumerate(ids.tolist()):
                t, s = int(self.tier[tok]), int(self.slot[tok])
                self.coeffs[t][s] = coeff[i, : self.tier_ranks[t]]

    def keep_rows(self, ids: torch.Tensor) -> None:
        ids = ids.to(self.tier.device).long()
        tiers, slots = self.tier[ids].long(), self.slot[ids].long()
        new_slot = torch.empty_like(slots)
        new_tier = torch.empty_like(tiers)
        kept_ranks, kept_sizes, kept_coeffs = [], [], []
        for t in range(len(self.tier_ranks)):
            sel = (tiers == t).nonzero().squeeze(1)
            if not sel.numel():
                continue
            new_tier[sel] = len(kept_ranks)
            new_slot[sel] = torch.arange(sel.numel(), device=sel.device)
            coeffs = self.coeffs[t]  # the same parameter objects, with their flags
            coeffs.data = coeffs.data[slots[sel]].contiguous()
            kept_coeffs.append(coeffs)
            kept_ranks.append(self.tier_ranks[t])
            kept_sizes.append(int(sel.numel()))
        self.coeffs = nn.ParameterList(kept_coeffs)
        self.tier, self.slot = new_tier.to(torch.int32), new_slot.to(torch.int32)
        self.tier_ranks, self.tier_sizes, self.num_embeddings = kept_ranks, kept_sizes, int(ids.numel())
        if max(kept_ranks) < self.basis.shape[0]:
            self.basis.data = self.basis.data[: max(kept_ranks)].contiguous()

    def spec(self) -> dict[str, Any]:
        return {**self._base_spec(), "tier_ranks": list(self.tier_ranks), "tier_sizes": list(self.tier_sizes)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> AdaptiveRankEmbedding:
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["tier_ranks"], spec["tier_sizes"],
                   padding_idx=spec.get("padding_idx"), embed_scale=spec.get("embed_scale"))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tier_ranks={self.tier_ranks}, "
                f"tier_sizes={self.tier_sizes}")
