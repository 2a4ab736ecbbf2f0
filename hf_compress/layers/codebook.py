"""Codebook linear layer: weights stored as bit-packed indices into small fp16 codebooks.

Layout (``G`` row groups, ``K`` codewords of ``d`` weights each, ``b`` index bits):

* rows (output neurons) are reordered so each group is contiguous: sorted row ``r`` is original row ``perm[r]``;
  group sizes are balanced (``out // G`` rows, the first ``out % G`` groups one more), so they need no storage;
* ``W_sorted[r, j·d:(j+1)·d] = scales[g(r)] · codebooks[book(r), codes[r, j]]`` with ``book(r) = g(r)`` (one
  codebook per group) or ``0`` (one shared codebook, a scale per group);
* with ``block_size = B > 0`` (blocks of ``B`` input columns, like "g128" quantization) every (sorted row, block)
  instead gets an fp16 scale and offset, ``scales, offsets [out, in/B]``:
  ``W_sorted[r, j·d:(j+1)·d] = scales[r, jd//B] · codebooks[book(r), codes[r, j]] + offsets[r, jd//B]`` (the
  codebooks then live in the normalized ``[0, 1]`` range of a block; a uniform codebook is asymmetric
  round-to-nearest with groups of ``B``, up to the fp16 rounding of each block's minimum and scale);
* ``codes [out, in/d]`` are packed into ``ceil(out·in/d·b / 8)`` bytes (``indices``, uint8), ``perm`` into
  ``ceil(out·ceil(log2 out) / 8)`` bytes; both are persistent buffers, so safetensors stores them as is.

Forward modes (``layer.mode``): ``"cached"`` (default) dequantizes once and keeps the dense weight until the
codebooks, scales or indices change (tracked by tensor version counters); ``"lookup"`` keeps only the unpacked
codes (int16, 2 B/weight) and gathers from the codebook at every call: half the resident memory of an fp32
dense weight, but ~5x slower forward on CPU in our measurement (MiniLM-L6: 1.22 s vs 0.22 s), so "cached" is the
default. While training with trainable codebooks/scales the weight is rebuilt differentiably every call, never
cached.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..packing import pack_bits, packed_nbytes, unpack_bits
from ..registry import register_layer
from .common import content_key, reusable

MODES = ("cached", "lookup")


def perm_bits(out_features: int) -> int:
    """Bits per stored row index: ``max(1, ceil(log2(out_features)))``."""
    return max(1, math.ceil(math.log2(max(out_features, 2))))


def group_sizes(out_features: int, n_groups: int) -> torch.Tensor:
    """Balanced group sizes ``[n_groups]`` (the first ``out % n_groups`` groups get one extra row)."""
    base, extra = divmod(out_features, n_groups)
    return torch.tensor([base + (g < extra) for g in range(n_groups)], dtype=torch.long)


def _check_layout(in_features: int, out_features: int, bits: int, vector_dim: int, codebook_size: int,
                  n_groups: int, block_size: int = 0) -> None:
    who = f"CodebookLinear({in_features}->{out_features})"
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"hf_compress: {who}: bits must be an int in 1..16, got {bits!r}.")
    if vector_dim < 1 or in_features % vector_dim:
        raise ValueError(
            f"hf_compress: {who}: vector_dim {vector_dim} must be >= 1 and divide in_features {in_features}."
        )
    if not 2 <= codebook_size <= 1 << bits:
        raise ValueError(f"hf_compress: {who}: codebook_size {codebook_size} must be in [2, 2**bits = {1 << bits}].")
    if not 1 <= n_groups <= out_features:
        raise ValueError(f"hf_compress: {who}: n_groups {n_groups} must be in [1, out_features = {out_features}].")
    if block_size and (block_size < 0 or in_features % block_size or block_size % vector_dim):
        raise ValueError(f"hf_compress: {who}: block_size {block_size} must divide in_features {in_features} and be a "
                         f"multiple of vector_dim {vector_dim}.")
    smallest = (out_features // n_groups) * (in_features // vector_dim)
    if codebook_size > smallest:
        raise ValueError(
            f"hf_compress: {who}: a codebook of {codebook_size} codewords exceeds the {smallest} weight vectors of "
            "a row group; use fewer bits, a larger group_size (fewer groups) or a smaller vector_dim."
        )


@register_layer
class CodebookLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored as packed codebook indices (see the module docstring for the layout).

    Tensors: ``indices`` uint8 ``[ceil(out·in/d·bits/8)]``, ``perm`` uint8 ``[ceil(out·pbits/8)]``,
    ``codebooks`` ``[G or 1, K, d]`` (fp16 by default, trainable), ``scales`` ``[G]`` (or ``[out, in/B]`` with
    ``offsets [out, in/B]`` when ``block_size = B > 0``), ``bias`` ``[out]``.
    """

    layer_type = "codebook_linear"
    #: fp16 storage parameters, frozen unless ``methods.jlcm.mark_codebooks_trainable`` gives them fp32 masters
    STORAGE = ("codebooks", "scales", "offsets")

    def __init__(self, in_features: int, out_features: int, bits: int, vector_dim: int = 1,
                 codebook_size: int | None = None, n_groups: int = 1, shared_codebook: bool = False,
                 bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = torch.float16, block_size: int = 0) -> None:
        super().__init__()
        codebook_size = (1 << bits) if codebook_size is None else codebook_size
        block_size = block_size or 0
        _check_layout(in_features, out_features, bits, vector_dim, codebook_size, n_groups, block_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.vector_dim, self.codebook_size = bits, vector_dim, codebook_size
        self.n_groups, self.shared_codebook, self.block_size = n_groups, shared_codebook, block_size
        self.mode, self.storage_dtype = "cached", dtype or torch.float16
        n_codes = out_features * in_features // vector_dim
        books = 1 if shared_codebook else n_groups
        self.register_buffer("indices", torch.zeros(packed_nbytes(n_codes, bits), dtype=torch.uint8, device=device))
        self.register_buffer(
            "perm", torch.zeros(packed_nbytes(out_features, perm_bits(out_features)), dtype=torch.uint8, device=device)
        )
        # fp16 storage, frozen: Adam on fp16 parameters underflows and wrecks them; fine-tune through
        # hf_compress.methods.jlcm.mark_codebooks_trainable (fp32 master copies)
        self.codebooks = nn.Parameter(torch.zeros(books, codebook_size, vector_dim, device=device, dtype=dtype),
                                      requires_grad=False)
        scale_shape = (out_features, in_features // block_size) if block_size else (n_groups,)
        self.scales = nn.Parameter(torch.ones(scale_shape, device=device, dtype=dtype), requires_grad=False)
        self.offsets = (nn.Parameter(torch.zeros(scale_shape, device=device, dtype=dtype), requires_grad=False)
                        if block_size else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None  # default dtype
        # follows .to()/.half()/from_pretrained(dtype=) where the storage does not: the model's dtype, read by
        # PEFT adapters beside this layer (hf_compress.lora); not saved
        self.register_buffer("compute_dtype_anchor", torch.empty(0, device=device), persistent=False)
        self._codes_cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self._weight_cache: tuple[Any, torch.Tensor] | None = None

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, perm: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None, bits: int, dtype: torch.dtype = torch.float16,
                   offsets: torch.Tensor | None = None, n_groups: int | None = None) -> CodebookLinear:
        """Build from ``codes [out, in/d]`` (rows in group order), ``perm [out]`` (original row of each sorted row),
        ``codebooks [G or 1, K, d]``, ``scales [G]`` and ``bias [out]``; or, blockwise, ``scales`` and ``offsets``
        ``[out, in/B]`` (sorted rows) with ``n_groups`` row groups."""
        out_features, n_vec = codes.shape
        books, k, d = codebooks.shape
        block = 0 if offsets is None else n_vec * d // scales.shape[1]
        groups = scales.numel() if offsets is None else (n_groups or books)
        layer = cls(n_vec * d, out_features, bits, d, k, groups, books == 1 and groups > 1,
                    bias is not None, dtype=dtype, block_size=block)
        if books not in (1, groups):
            raise ValueError("hf_compress: CodebookLinear.from_codes: codebooks must number 1 or one per group.")
        with torch.no_grad():
            layer.indices.copy_(pack_bits(codes, bits))
            layer.perm.copy_(pack_bits(perm, perm_bits(out_features)))
            layer.codebooks.copy_(codebooks)
            layer.scales.copy_(scales)
            if offsets is not None:
                layer.offsets.copy_(offsets)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    # ---- decoding -------------------------------------------------------------------------------------------
    def row_groups(self) -> torch.Tensor:
        """Group of each sorted row, ``[out]`` long."""
        sizes = group_sizes(self.out_features, self.n_groups).to(self.indices.device)
        return torch.repeat_interleave(torch.arange(self.n_groups, device=sizes.device), sizes)

    def permutation(self) -> torch.Tensor:
        """``perm [out]``: original row index of each sorted row."""
        return unpack_bits(self.perm, perm_bits(self.out_features), self.out_features)

    def codes(self) -> torch.Tensor:
        """Unpacked indices ``[out, in/d]`` (sorted row order; cached, int16/int32)."""
        key = (content_key(self.indices), content_key(self.perm))  # (the cache holds perm's inverse too)
        if self._codes_cache is None or self._codes_cache[0] != key or not reusable(self._codes_cache[1]):
            n = self.out_features * self.in_features // self.vector_dim
            small = torch.int16 if self.bits <= 15 else torch.int32
            codes = unpack_bits(self.indices, self.bits, n, dtype=small).view(self.out_features, -1)
            perm = self.permutation()
            if bool((perm >= self.out_features).any()) or bool(
                    (torch.bincount(perm.long(), minlength=self.out_features) != 1).any()) or \
                    (codes.numel() and int(codes.max()) >= self.codebooks.shape[1]):
                raise ValueError(f"hf_compress: CodebookLinear({self.in_features}->{self.out_features}): the stored "
                                 "row permutation or codes are out of range (the checkpoint is damaged); re-save "
                                 "the compressed model.")
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(self.out_features, device=perm.device)
            self._codes_cache = (key, codes, inv)
        return self._codes_cache[1]

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """Dense ``W [out, in]`` in original row order (differentiable w.r.t. codebooks and scales)."""
        codes = self.codes().long()
        inv = self._codes_cache[2]
        groups = self.row_groups()
        books = torch.zeros_like(groups) if self.codebooks.shape[0] == 1 else groups
        w = self.codebooks.to(dtype)[books[:, None], codes]  # [out, in/d, d]
        if self.block_size:
            w = w.reshape(self.out_features, -1, self.block_size) * self.scales.to(dtype)[:, :, None]
            w = (w + self.offsets.to(dtype)[:, :, None]).reshape(self.out_features, self.in_features)
        else:
            w = w.reshape(self.out_features, self.in_features) * self.scales.to(dtype)[groups][:, None]
        return w[inv]

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (decoded; for inspection and export)."""
        return self._dequantize(self.codebooks.dtype if self.codebooks.is_floating_point() else torch.float32)

    def storage(self) -> list[nn.Parameter]:
        """The storage parameters present (``offsets`` only with blocks), see :attr:`STORAGE`."""
        return [p for p in (getattr(self, n) for n in self.STORAGE) if p is not None]

    def _apply(self, fn: Any, recurse: bool = True) -> CodebookLinear:
        """As ``nn.Module._apply`` (``.to()``, ``.half()``, ``.cuda()`` ...), but the storage parameters keep their
        dtype: ``model.to(torch.bfloat16)`` moves them with the model and the forward decodes in the input's dtype,
        instead of rounding the stored fp16 codebooks to bf16 (which a later save would write)."""
        kept = {n: (p.data, None if p.grad is None else p.grad.data)  # aliases of the tensors before the cast
                for n in self.STORAGE if (p := getattr(self, n)) is not None}
        super()._apply(fn, recurse)
        for name, (old, grad) in kept.items():
            p = getattr(self, name)
            if p.dtype != old.dtype and p.is_floating_point():  # the stored values (and grads), moved only
                p.grad = None
                p.data = old.to(p.device)
                if grad is not None and grad.dtype == p.dtype:  # (a grad of another dtype cannot be put back)
                    p.grad = grad.to(p.device)
        self.clear_cache()
        return self

    def _fp32_masters(self) -> None:
        """Trainable fp16/bf16 storage becomes fp32 (in place: optimizers keep the same parameter objects), as
        ``mark_codebooks_trainable`` does: PEFT's ``modules_to_save`` or ``requires_grad_(True)`` turn training on
        without it, and Adam on fp16 storage loses every small update. ``freeze_codebooks`` returns it to fp16."""
        for p in self.storage():
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()

    def clear_cache(self) -> None:
        """Drop the decoded caches. They are keyed on the tensors' in-place version counters, which writes through
        ``.data`` (``p.data.mul_(2)``) do not bump: call this after such writes."""
        self._codes_cache = self._weight_cache = None

    def dense_weight(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """The decoded ``[out, in]`` weight in ``dtype``, as ``forward`` uses it: rebuilt differentiably while
        codebooks / scales are trained (or in ``"lookup"`` mode), else cached until their contents change."""
        if self.codebooks.dtype not in (self.storage_dtype, torch.float32) and not self.codebooks.requires_grad:
            raise ValueError(
                f"hf_compress: CodebookLinear({self.in_features}->{self.out_features}): its {self.storage_dtype} "
                f"codebooks were cast to {self.codebooks.dtype} past the layer (accelerate's load_checkpoint_and_"
                "dispatch(..., dtype=) casts every floating tensor), rounding the stored values. Load without dtype= "
                "and call model.to(dtype) after (the layer keeps its storage), or use from_pretrained(dtype=...)."
            )
        training = self.codebooks.requires_grad or self.scales.requires_grad
        training |= self.offsets is not None and self.offsets.requires_grad
        training &= torch.is_grad_enabled()
        if self.mode == "lookup" or training:
            if training:
                self._fp32_masters()
            self._weight_cache = None
            return self._dequantize(dtype)
        key = (*map(content_key, (self.codebooks, self.scales, self.indices, self.perm)), dtype, device,
               None if self.offsets is None else content_key(self.offsets))
        if self._weight_cache is None or self._weight_cache[0] != key or not reusable(self._weight_cache[1]):
            with torch.no_grad():
                self._weight_cache = (key, self._dequantize(dtype).detach())
            self._codes_cache = None  # cached mode keeps only the dense weight (4 B/weight in fp32), not the codes
        return self._weight_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype, x.device), bias)

    # ---- accounting / serialization ---------------------------------------------------------------------------
    def storage_bytes(self) -> dict[str, int]:
        """Bytes of each stored tensor as it would be saved now (dtype as is)."""
        return {n: t.numel() * t.element_size() for n, t in [*self.named_buffers(recurse=False),
                                                               *self.named_parameters(recurse=False)]
                if n not in self._non_persistent_buffers_set}

    def spec(self) -> dict[str, Any]:
        return {"type": self.layer_type, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "vector_dim": self.vector_dim, "codebook_size": self.codebook_size,
                "n_groups": self.n_groups, "shared_codebook": self.shared_codebook, "bias": self.bias is not None,
                "block_size": self.block_size, **self._storage_dtype_spec()}

    def _storage_dtype_spec(self) -> dict[str, str]:
        """``{"storage_dtype": ...}`` when any storage tensor is not fp16 (fp32 masters trained, saved as they are:
        the widest one, so a reload holds every saved value), else ``{}``."""
        widest = max((p.dtype for p in self.storage()), key=lambda t: torch.finfo(t).bits)
        return {} if all(p.dtype == torch.float16 for p in self.storage()) else {"storage_dtype": str(widest)[6:]}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CodebookLinear:
        dtype = getattr(torch, spec.get("storage_dtype", "float16"), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"hf_compress: codebook layer spec has storage_dtype {spec['storage_dtype']!r}, not a "
                             "torch floating dtype; re-save the compressed model.")
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["vector_dim"], spec["codebook_size"],
                   spec["n_groups"], spec["shared_codebook"], spec["bias"], dtype=dtype,
                   block_size=spec.get("block_size", 0))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self.clear_cache()
        for name in self.STORAGE:  # fp32 masters saved while training (a Trainer checkpoint) load as fp32, unrounded
            p, incoming = getattr(self, name), state_dict.get(prefix + name)
            if (p is not None and isinstance(incoming, torch.Tensor) and incoming.dtype == torch.float32
                    and p.dtype in (torch.float16, torch.bfloat16)):
                p.data = p.data.float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"vector_dim={self.vector_dim}, codebook_size={self.codebook_size}, n_groups={self.n_groups}, "
                f"shared_codebook={self.shared_codebook}, block_size={self.block_size}, mode={self.mode!r}")
