"""Subspace token embeddings (Jaiswal & Liu, CIKM'23): a token's vector is the concatenation of f sub-vectors.

The hidden dimension ``d`` is split into ``f`` slices of widths ``w_1 .. w_f`` (``d // f`` each, the last one takes
the remainder). Slice ``k`` has its own small table ``tables[k] [n, w_k]``; token ``v`` reads row ``c_k(v)`` of
every table, so ``V·d`` parameters become ``n·d``. The code ``(c_1(v) .. c_f(v))`` is either

* ``"modulo"``: computed, nothing stored. With moduli ``m_k = n, n-1, …, n-f+1`` (when their lcm covers ``V``,
  :func:`spread_moduli`): ``c_k(v) = v mod m_k``, distinct for every token (Chinese remainder theorem) and spread
  over (almost) all ``n`` rows of every table. Otherwise the mixed radix ``c_k(v) = ⌊v / b^(k-1)⌋ mod b`` with the
  smallest base ``b <= n`` that covers ``V`` (``b^f >= V``), so that every digit varies (a base as large as ``n``
  would leave the digits past ``⌈log_n V⌉`` at 0 for every token). Layers saved before moduli were recorded use
  ``b = n``; or
* ``"context"``: learned from the pretrained table (see ``hf_compress.methods.subspace``) and stored in the
  checkpoint bit-packed: ``codes`` is ``uint8 [ceil(V·f·b / 8)]`` with ``b = ceil(log2 n)`` bits per index (an
  unpacked ``[V, f]`` copy is cached for lookups). Checkpoints written before packing (``packed_codes=False`` in
  the layer spec) hold ``codes [V, f]`` as uint8 / int16 / int32 and still load.

A head tied to this table (:class:`~hf_compress.layers.tt_embedding.TiedEmbeddingHead`) computes logits
factor-wise, ``logits[..., v] = Σ_k (h_k @ tables[k]ᵀ)[..., c_k(v)]``: ``f`` small matmuls and row gathers instead of
materializing ``[V, d]`` each call (``factored_logits=False`` selects that path, for timing). Measured on SmolLM2
(V = 49,152, f = 8, 1 CPU thread): ~2 ms vs ~0.5 s for one decode row; about equal at 256 rows.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ..packing import pack_bits, packed_nbytes, unpack_bits
from ..registry import register_layer
from .common import content_key
from .tt_embedding import CompressedEmbedding

ASSIGNMENTS = ("modulo", "context")


def split_widths(dim: int, num_subspaces: int, who: str = "SubspaceEmbedding") -> list[int]:
    """Slice widths of ``dim`` for ``num_subspaces`` slices: ``dim // f`` each, the last takes the remainder."""
    if not isinstance(num_subspaces, int) or isinstance(num_subspaces, bool) or num_subspaces < 1:
        raise ValueError(f"hf_compress: {who}: num_subspaces (f) must be an int >= 1, got {num_subspaces!r}.")
    if num_subspaces > dim:
        raise ValueError(f"hf_compress: {who}: num_subspaces = {num_subspaces} exceeds the embedding dimension {dim}; "
                         f"every sub-vector needs width >= 1, so use f <= {dim}.")
    base = dim // num_subspaces
    return [base] * (num_subspaces - 1) + [dim - base * (num_subspaces - 1)]


def check_rows(vocab: int, num_rows: int, num_subspaces: int, who: str = "SubspaceEmbedding") -> None:
    """Raise unless ``1 <= n`` and ``n^f >= V`` (every token can get a distinct code)."""
    if not isinstance(num_rows, int) or isinstance(num_rows, bool) or num_rows < 1:
        raise ValueError(f"hf_compress: {who}: num_rows (n) must be an int >= 1, got {num_rows!r}.")
    if num_rows ** num_subspaces < vocab:
        need = min_rows(vocab, num_subspaces)
        raise ValueError(f"hf_compress: {who}: num_rows^num_subspaces = {num_rows}^{num_subspaces} = "
                         f"{num_rows ** num_subspaces} < vocabulary size {vocab}, so tokens cannot all get distinct "
                         f"codes; use num_rows >= {need} or more subspaces.")


def min_rows(vocab: int, num_subspaces: int) -> int:
    """The smallest ``n`` with ``n^f >= V`` (exact integer arithmetic)."""
    n = max(1, round(vocab ** (1.0 / num_subspaces)) - 1)
    while n ** num_subspaces < vocab:
        n += 1
    return n


def code_dtype(num_rows: int) -> torch.dtype:
    """Smallest integer dtype that stores row indices ``0 .. n-1`` (safetensors-compatible)."""
    if num_rows <= 256:
        return torch.uint8
    return torch.int16 if num_rows <= 32767 else torch.int32


def code_bits(num_rows: int) -> int:
    """Bits per packed index for row indices ``0 .. n-1``: ``max(1, ceil(log2 n))``."""
    return max(1, (num_rows - 1).bit_length())


def spread_moduli(vocab: int, num_rows: int, num_subspaces: int) -> list[int] | None:
    """Moduli ``[n, n-1, …, n-f+1]`` when their lcm is ``>= V`` (then ``v mod m_k`` gives every token a distinct
    code and table ``k`` uses ``m_k`` of its ``n`` rows), else ``None`` (use the mixed radix)."""
    moduli = [num_rows - k for k in range(num_subspaces)]
    if moduli[-1] < 2 or math.lcm(*moduli) < vocab:  # a modulus of 1 would give a constant table
        return None
    return moduli


def modulo_codes(ids: torch.Tensor, num_rows: int, num_subspaces: int) -> torch.Tensor:
    """``ids [m]`` -> codes ``[m, f]`` with ``c_k = ⌊id / n^k⌋ mod n`` (k = 0 .. f-1), exact integer arithmetic."""
    ids = ids.long()
    cols = []
    for _ in range(num_subspaces):
        cols.append(torch.remainder(ids, num_rows))
        ids = torch.div(ids, num_rows, rounding_mode="floor")
    return torch.stack(cols, 1)


@register_layer
class SubspaceEmbedding(CompressedEmbedding):
    """Token embedding ``[V, d]`` stored as ``f`` tables ``tables[k] [n, w_k]`` plus a code per token.

    Args:
        num_embeddings: vocabulary size ``V``.
        embedding_dim: ``d = Σ w_k``.
        num_rows: rows ``n`` of every table (``n^f >= V``).
        widths: slice widths ``w_1 .. w_f`` (default: ``d // f`` each, the last takes the remainder).
        assignment: ``"modulo"`` (codes computed) or ``"context"`` (codes stored in the ``codes [V, f]`` buffer).
        num_subspaces: ``f`` when ``widths`` is not given.
        factored_logits: tied-head logits from per-table products (default) instead of a materialized ``[V, d]``.
        packed_codes: store context codes bit-packed (default); ``False`` is the older ``[V, f]`` integer layout.
        moduli: ``"modulo"`` codes ``v mod m_k`` (``f`` ints in ``1..n`` with lcm ``>= V``); ``"auto"`` (default):
            :func:`spread_moduli`, else the mixed radix in base :func:`min_rows`; ``None``: the mixed radix.
        radix: base of the mixed radix when there are no moduli (default ``n``, as layers saved before moduli).
    """

    layer_type = "subspace_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, num_rows: int, widths: list[int] | None = None,
                 assignment: str = "modulo", num_subspaces: int = 2, padding_idx: int | None = None,
                 embed_scale: float | None = None, factored_logits: bool = True, packed_codes: bool = True,
                 moduli: list[int] | str | None = "auto", radix: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(embedding_dim, padding_idx, embed_scale)
        who = f"SubspaceEmbedding({num_embeddings}x{embedding_dim})"
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"hf_compress: {who}: assignment must be one of {ASSIGNMENTS}, got {assignment!r}.")
        widths = [int(w) for w in widths] if widths is not None else split_widths(embedding_dim, num_subspaces, who)
        if not widths or min(widths) < 1 or sum(widths) != embedding_dim:
            raise ValueError(f"hf_compress: {who}: widths {widths} must be >= 1 and sum to the embedding dimension "
                             f"{embedding_dim}; leave widths=None to split it evenly.")
        check_rows(num_embeddings, num_rows, len(widths), who)
        if assignment != "modulo":
            moduli = radix = None
        elif moduli == "auto":
            moduli = spread_moduli(num_embeddings, num_rows, len(widths))
            radix = None if moduli is not None else min_rows(num_embeddings, len(widths))
        elif moduli is not None:
            moduli = [int(m) for m in moduli]
            if len(moduli) != len(widths) or not all(1 <= m <= num_rows for m in moduli) \
                    or math.lcm(*moduli) < num_embeddings:
                raise ValueError(f"hf_compress: {who}: moduli {moduli} must be {len(widths)} ints in 1..{num_rows} "
                                 f"whose lcm is >= the vocabulary size {num_embeddings} (distinct codes); "
                                 "use moduli='auto'.")
        if assignment == "modulo" and moduli is None:
            radix = num_rows if radix is None else int(radix)
            if not 1 <= radix <= num_rows or radix ** len(widths) < num_embeddings:
                raise ValueError(f"hf_compress: {who}: radix {radix} must be in 1..{num_rows} with "
                                 f"radix^{len(widths)} >= the vocabulary size {num_embeddings}.")
        self.moduli, self.radix = moduli, radix
        if radix is not None and radix ** (len(widths) - 1) >= num_embeddings:  # the top digit is always 0
            varying = next(t for t in range(len(widths) + 1) if radix ** t >= num_embeddings)
            warnings.warn(f"hf_compress: {who}: with {len(widths)} subspaces in base {radix}, tables {varying + 1}.."
                          f"{len(widths)} give every token the same row; use fewer subspaces (<= {max(1, varying)}) "
                          "or more rows.", UserWarning, stacklevel=2)
        self.num_embeddings, self.num_rows, self.widths = num_embeddings, num_rows, widths
        self.assignment, self.factored_logits, self.packed_codes = assignment, factored_logits, packed_codes
        self._code_cache: tuple[Any, torch.Tensor] | None = None
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(num_rows, w, device=device, dtype=dtype)) for w in widths  # [n, w_k]
        )
        if assignment == "context" and packed_codes:
            nbytes = packed_nbytes(num_embeddings * len(widths), code_bits(num_rows))
            self.register_buffer("codes", torch.zeros(nbytes, device=device, dtype=torch.uint8))  # packed [V, f]
        elif assignment == "context":
            self.register_buffer("codes", torch.zeros(num_embeddings, len(widths), device=device,
                                                      dtype=code_dtype(num_rows)))  # [V, f]
        else:
            self.register_buffer("codes", None)  # modulo: computed, nothing stored

    @property
    def num_subspaces(self) -> int:
        return len(self.widths)

    def set_codes(self, codes: torch.Tensor) -> None:
        """Store the codes ``[V, f]`` of a context assignment (packed unless ``packed_codes`` is off)."""
        codes = codes.to(self.tables[0].device)
        self.num_embeddings = int(codes.shape[0])
        self.codes = pack_bits(codes, code_bits(self.num_rows)) if self.packed_codes \
            else codes.to(code_dtype(self.num_rows))
        self._code_cache = None

    def code_table(self) -> torch.Tensor:
        """Stored codes unpacked, ``[V, f]`` (:func:`code_dtype`; cached until ``codes`` changes)."""
        if not self.packed_codes:
            return self.codes
        key = (content_key(self.codes), self.codes.device)
        if self._code_cache is None or self._code_cache[0] != key:
            n = self.num_embeddings * self.num_subspaces
            table = unpack_bits(self.codes, code_bits(self.num_rows), n, dtype=code_dtype(self.num_rows))
            table = table.view(self.num_embeddings, -1)
            if table.numel() and int(table.max()) >= self.num_rows:
                raise ValueError(f"hf_compress: SubspaceEmbedding({self.num_embeddings}, {self.embedding_dim}): a "
                                 f"stored code is >= num_rows={self.num_rows} (the checkpoint is damaged); re-save "
                                 "the compressed model.")
            self._code_cache = (key, table)
        return self._code_cache[1]

    def codes_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes ``[m, f]`` (int64) of the flat token ids ``ids [m]``."""
        if self.codes is None and self.moduli is not None:
            return torch.stack([torch.remainder(ids.long(), m) for m in self.moduli], 1)
        if self.codes is None:
            return modulo_codes(ids, self.radix, self.num_subspaces)
        return self.code_table()[ids].long()

    def all_codes(self) -> torch.Tensor:
        """Codes ``[V, f]`` (int64) of the whole vocabulary."""
        return self.codes_of(torch.arange(self.num_embeddings, device=self.tables[0].device))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        codes = self.codes_of(ids)  # [m, f]
        if len(set(self.widths)) == 1:  # equal widths: one gather from the stacked tables [f·n, w], not f gathers
            offsets = torch.arange(self.num_subspaces, device=codes.device) * self.num_rows
            flat = torch.stack(list(self.tables)).reshape(-1, self.widths[0])
            return flat[(codes + offsets).reshape(-1)].reshape(codes.shape[0], self.embedding_dim)
        return torch.cat([t[codes[:, k]] for k, t in enumerate(self.tables)], 1)  # [m, d]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied-head logits ``hidden [..., d]`` -> ``[..., V]``, factor-wise unless ``factored_logits`` is off."""
        if not self.factored_logits:
            return super().logits(hidden)
        codes = self.all_codes()  # [V, f]
        flat = hidden.reshape(-1, hidden.shape[-1])  # [R, d]
        out = None
        for k, (t, h) in enumerate(zip(self.tables, flat.split(self.widths, -1))):
            part = (h @ t.to(h.dtype).T).T.contiguous().index_select(0, codes[:, k])  # [n, R] -> [V, R] rows
            out = part if out is None else out + part
        return out.T.reshape(*hidden.shape[:-1], self.num_embeddings)

    def keep_rows(self, ids: torch.Tensor) -> None:
        """Keep tokens ``ids [m]`` (token ``ids[i]`` becomes ``i``); the codes become explicit (``context``)."""
        codes = self.codes_of(ids.to(self.tables[0].device))
        if self.codes is None:  # modulo had no buffer: a context layer now, packed
            self.packed_codes = True
        self.assignment, self.moduli, self.radix = "context", None, None
        self.set_codes(codes)

    def spec(self) -> dict[str, Any]:
        return {**self._base_spec(), "num_rows": self.num_rows, "widths": list(self.widths),
                "assignment": self.assignment, "factored_logits": self.factored_logits,
                "packed_codes": self.packed_codes, "moduli": self.moduli, "radix": self.radix}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SubspaceEmbedding:
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["num_rows"], widths=spec["widths"],
                   assignment=spec["assignment"], padding_idx=spec.get("padding_idx"),
                   embed_scale=spec.get("embed_scale"), factored_logits=spec.get("factored_logits", True),
                   packed_codes=spec.get("packed_codes", False), moduli=spec.get("moduli"),
                   radix=spec.get("radix"))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, num_rows={self.num_rows}, widths={self.widths}, "
                f"assignment={self.assignment!r}")
