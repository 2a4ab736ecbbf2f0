"""Tensor-train token embeddings (TensorSLM) and a head that reads a compressed table.

``TTEmbedding`` is the paper's format: every token's vector ``w_v`` (length ``d = ∏ n_k``) is reshaped to an
order-N tensor and stored as its own tensor train, cores ``[V, r_{k-1}, n_k, r_k]`` (``r_0 = r_N = 1``); the
vocabulary axis is not factorized. A lookup contracts only the selected tokens' cores, never the whole table.

All compressed embeddings here share :class:`CompressedEmbedding`: ``rows(ids)`` (unscaled ``[n, d]``),
``forward(ids)`` (``[..., d]``, times ``embed_scale`` as Gemma's scaled embedding does), ``logits(h)`` for a tied
head, and the dynamic-vocabulary operations ``add_rows`` / ``set_rows`` / ``keep_rows``.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any

import torch
from torch import nn

from ..registry import register_layer


def check_tt_shape_ranks(dim: int, shape: list[int], ranks: list[int], who: str) -> None:
    """Raise a clear ``ValueError`` unless ``∏ shape == dim`` and every ``1 <= r_k <= min(∏ n_{≤k}, ∏ n_{>k})``."""
    if any(int(n) < 1 for n in shape) or math.prod(shape) != dim:
        raise ValueError(
            f"hf_compress: {who}: TT shape {list(shape)} has product {math.prod(shape)}, but the embedding "
            f"dimension is {dim}; give factors whose product is {dim} (or leave shape=None to choose it)."
        )
    if len(ranks) != len(shape) - 1:
        raise ValueError(
            f"hf_compress: {who}: a TT of order {len(shape)} needs {len(shape) - 1} inner ranks, got {list(ranks)}."
        )
    for k, r in enumerate(ranks):
        limit = min(math.prod(shape[: k + 1]), math.prod(shape[k + 1:]))
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"hf_compress: {who}: TT rank r_{k + 1} must be an int >= 1, got {r!r}.")
        if r > limit:
            raise ValueError(
                f"hf_compress: {who}: TT rank r_{k + 1} = {r} exceeds the size of unfolding {k + 1} of a "
                f"{list(shape)} tensor (min({math.prod(shape[: k + 1])}, {math.prod(shape[k + 1:])}) = {limit}); "
                f"use r_{k + 1} <= {limit}."
            )


def contract_cores(cores: list[torch.Tensor]) -> torch.Tensor:
    """Batched TT contraction: cores ``[B, r_{k-1}, n_k, r_k]`` (``r_0 = r_N = 1``) -> ``[B, ∏ n_k]``."""
    b = cores[0].shape[0]
    out = cores[0].reshape(b, cores[0].shape[2], cores[0].shape[3])  # [B, n_1, r_1] (explicit sizes: B may be 0)
    for core in cores[1:]:
        r_prev, n, r = core.shape[1:]
        out = torch.bmm(out, core.reshape(b, r_prev, n * r)).reshape(b, out.shape[1] * n, r)  # [B, P·n, r]
    return out.reshape(b, out.shape[1] * out.shape[2])


class CompressedEmbedding(nn.Module):
    """Common runtime of compressed token embeddings (``[V, d]`` tables)."""

    num_embeddings: int
    embedding_dim: int

    def __init__(self, embedding_dim: int, padding_idx: int | None = None, embed_scale: float | None = None) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale

    # --- to implement -------------------------------------------------------------------------------------
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Unscaled embedding rows ``[n, d]`` of the flat token ids ``ids [n]``."""
        raise NotImplementedError

    def add_rows(self, vectors: torch.Tensor) -> None:
        """Compress ``vectors [m, d]`` and append them as tokens ``V .. V+m-1``."""
        raise NotImplementedError(f"hf_compress: {type(self).__name__} does not support adding tokens.")

    def set_rows(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        """Compress ``vectors [m, d]`` into the existing rows ``ids [m]``."""
        raise NotImplementedError(f"hf_compress: {type(self).__name__} does not support overwriting tokens.")

    def keep_rows(self, ids: torch.Tensor) -> None:
        """Keep only the rows ``ids [m]`` (in that order): token ``ids[i]`` becomes token ``i``."""
        raise NotImplementedError(f"hf_compress: {type(self).__name__} does not support pruning tokens.")

    # --- shared -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [...]`` -> ``[..., d]``."""
        flat = input_ids.reshape(-1)
        # checked on the CPU only (as nn.Embedding, elsewhere the gather asserts on the device): a host read of the
        # ids would synchronize every GPU forward and break torch.compile graphs
        if flat.device.type == "cpu" and not torch.compiler.is_compiling() and flat.numel() and bool(
                ((flat < 0) | (flat >= self.num_embeddings)).any()):
            raise IndexError(
                f"hf_compress: token id out of range [0, {self.num_embeddings}) for {type(self).__name__}."
            )
        out = self.rows(flat)
        if self.padding_idx is not None and out.requires_grad:  # as nn.Embedding: padding rows give no gradient
            pad = self.padding_idx % self.num_embeddings  # as nn.Embedding, -1 is the last row
            out = torch.where((flat == pad).unsqueeze(-1), out.detach(), out)
        out = out.reshape(*input_ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=out.dtype)
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[V, d]`` table (materialized on access, in chunks; for inspection and dense heads)."""
        chunks = [self.rows(torch.arange(s, min(s + 8192, self.num_embeddings), device=self._device()))
                  for s in range(0, self.num_embeddings, 8192)]
        return torch.cat(chunks)

    #: opt-in inference cache for :meth:`logits`: keep the materialized ``[V, d]`` table (a dense copy in memory)
    #: while grad is off and the parameters are unchanged; off by default so memory stays compressed.
    cache_table: bool = False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied-head logits ``hidden [..., d] @ weightᵀ`` -> ``[..., V]``."""
        return hidden @ self._logits_table().to(hidden.dtype).T

    def _logits_table(self) -> torch.Tensor:
        if not self.cache_table or torch.is_grad_enabled():
            self.__dict__.pop("_table_cache", None)
            return self.weight
        key = (self.num_embeddings, *((t.data_ptr(), t._version) for t in [*self.parameters(), *self.buffers()]))
        cached = self.__dict__.get("_table_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.weight.detach())
            self.__dict__["_table_cache"] = cached
        return cached[1]

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _base_spec(self) -> dict[str, Any]:
        return {"type": self.layer_type, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "embed_scale": self.embed_scale}


@register_layer
class TTEmbedding(CompressedEmbedding):
    """Per-token tensor-train embedding (TensorSLM): ``cores[k] [V, r_k, n_{k+1}, r_{k+1}]``.

    Args:
        num_embeddings: vocabulary size ``V``.
        embedding_dim: ``d = ∏ shape``.
        shape: the factors ``n_1 .. n_N`` of ``d``.
        ranks: inner TT ranks ``r_1 .. r_{N-1}``.
    """

    layer_type = "tt_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, shape: list[int], ranks: list[int],
                 padding_idx: int | None = None, embed_scale: float | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(embedding_dim, padding_idx, embed_scale)
        shape, ranks = [int(n) for n in shape], [int(r) for r in ranks]
        check_tt_shape_ranks(embedding_dim, shape, ranks, f"TTEmbedding({num_embeddings}x{embedding_dim})")
        self.num_embeddings, self.shape, self.ranks = num_embeddings, shape, ranks
        full = [1, *ranks, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(num_embeddings, full[k], n, full[k + 1], device=device, dtype=dtype))
            for k, n in enumerate(shape)
        )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, shape: list[int], ranks: list[int] | None = None,
                   eps: float | None = None, **kwargs: Any) -> TTEmbedding:
        """TT-SVD of every row of ``weight [V, d]`` at once (fixed ``ranks`` or tolerance ``eps``)."""
        from ..methods.tt_embedding import tt_svd_rows

        if weight.ndim != 2 or (ranks is None) == (eps is None):
            raise ValueError(f"hf_compress: TTEmbedding.from_dense takes a [V, d] weight and exactly one of ranks or "
                             f"eps; got a weight of shape {list(weight.shape)}, ranks={ranks}, eps={eps}.")
        check_tt_shape_ranks(weight.shape[1], shape, ranks if ranks is not None else [1] * (len(shape) - 1),
                             "TTEmbedding.from_dense")
        cores = tt_svd_rows(weight.detach(), shape, ranks=ranks, eps=eps)
        layer = cls(weight.shape[0], weight.shape[1], shape, [c.shape[-1] for c in cores[:-1]],
                    device=weight.device, dtype=weight.dtype, **kwargs)
        with torch.no_grad():
            for p, c in zip(layer.cores, cores):
                p.copy_(c)
        return layer

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return contract_cores([c[ids] for c in self.cores])

    def _compress(self, vectors: torch.Tensor) -> list[torch.Tensor]:
        from ..methods.tt_embedding import tt_svd_rows

        if vectors.ndim != 2 or vectors.shape[1] != self.embedding_dim:
            raise ValueError(f"hf_compress: new token vectors must be [m, {self.embedding_dim}], got "
                             f"{list(vectors.shape)}.")
        cores = tt_svd_rows(vectors.detach().to(self.cores[0].dtype), self.shape, ranks=self.ranks)
        return [c.to(self.cores[0].device) for c in cores]

    def add_rows(self, vectors: torch.Tensor) -> None:
        new = self._compress(vectors)
        for p, c in zip(self.cores, new):
            p.data = torch.cat([p.data, c])
        self.num_embeddings += vectors.shape[0]

    def set_rows(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        new = self._compress(vectors)
        with torch.no_grad():
            for p, c in zip(self.cores, new):
                p[ids] = c

    def keep_rows(self, ids: torch.Tensor) -> None:
        ids = ids.to(self.cores[0].device)
        for p in self.cores:
            p.data = p.data[ids].contiguous()
        self.num_embeddings = int(ids.numel())

    def spec(self) -> dict[str, Any]:
        return {**self._base_spec(), "shape": list(self.shape), "ranks": list(self.ranks)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TTEmbedding:
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["shape"], spec["ranks"],
                   padding_idx=spec.get("padding_idx"), embed_scale=spec.get("embed_scale"))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, shape={self.shape}, ranks={self.ranks}"


@register_layer
class TiedEmbeddingHead(nn.Module):
    """Output head tied to a compressed embedding: ``logits = h @ Wᵀ (+ bias)`` with ``W`` the compressed table.

    Holds no copy of the table: ``source`` (the embedding's module name) is resolved against the model by
    ``bind_model`` (called by ``compress`` and, on load, by the compressed model's ``__init__``).
    """

    layer_type = "tied_embedding_head"

    def __init__(self, source: str, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.source, self.in_features = source, in_features
        self._out_features = out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.__dict__["_embedding"] = None  # not a submodule: no second copy in the state dict

    def __deepcopy__(self, memo: dict[int, Any]) -> TiedEmbeddingHead:
        """Inside a copy of something larger (``memo`` already holds its parents) the copy reads the copied table of
        the copied model, copied here if the head comes first; a copy of the head alone (PEFT's ``modules_to_save``)
        reads the model's own table instead of a hidden private copy of it."""
        emb, ref = self.__dict__.get("_embedding"), self.__dict__.get("_model")
        root = ref() if ref is not None else None
        alone = not memo
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("_embedding", "_model"):
                new.__dict__[key] = copy.deepcopy(value, memo)
        if emb is not None and root is not None and not alone:
            copied = copy.deepcopy(root, memo)  # (its copy, made now or earlier; the table's comes with it)
            new.tie(copy.deepcopy(emb, memo), copied)
        else:
            new.__dict__["_embedding"], new.__dict__["_model"] = emb, ref
        return new

    def tie(self, embedding: nn.Module, model: nn.Module) -> None:
        """Read ``embedding`` (the compressed table of ``model``) from now on."""
        self.__dict__["_embedding"] = embedding
        self.__dict__["_model"] = weakref.ref(model)  # (not a submodule: no cycle, nothing saved twice)

    def bind_model(self, model: nn.Module) -> None:
        """Point this head at ``model.get_submodule(self.source)``."""
        self.tie(model.get_submodule(self.source), model)

    @property
    def embedding(self) -> CompressedEmbedding:
        emb = self.__dict__.get("_embedding")
        if emb is None:
            raise RuntimeError(f"hf_compress: TiedEmbeddingHead is not bound to {self.source!r}; call "
                               "head.bind_model(model).")
        return emb

    @property
    def out_features(self) -> int:
        emb = self.__dict__.get("_embedding")
        return self._out_features if emb is None else emb.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The tied ``[V, d]`` table, materialized (for inspection)."""
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., d]`` -> logits ``[..., V]``."""
        emb, hook = self.embedding, getattr(self.embedding, "_hf_hook", None)
        if hook is None:
            out = emb.logits(hidden)
        else:  # accelerate placed the table elsewhere or offloaded it: run its hook around the read
            (moved,), _ = hook.pre_forward(emb, hidden)
            out = hook.post_forward(emb, emb.logits(moved)).to(hidden.device)
        return out if self.bias is None else out + self.bias

    def keep_rows(self, ids: torch.Tensor) -> None:
        if self.bias is not None:
            self.bias.data = self.bias.data[ids.to(self.bias.device)].contiguous()
        self._out_features = int(ids.numel())

    def add_rows(self, count: int) -> None:
        if self.bias is not None:
            self.bias.data = torch.cat([self.bias.data, self.bias.data.new_zeros(count)])
        self._out_features += count

    def spec(self) -> dict[str, Any]:
        return {"type": self.layer_type, "source": self.source, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TiedEmbeddingHead:
        return cls(spec["source"], spec["in_features"], spec["out_features"], bias=spec.get("bias", False))

    def extra_repr(self) -> str:
        return f"source={self.source!r}, in_features={self.in_features}, out_features={self.out_features}"
