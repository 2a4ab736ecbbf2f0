"""Tucker-compressed attention projection: ``W`` viewed as a 3-way tensor ``[heads, head_dim, hidden]``.

``T ≈ G ×₁ A ×₂ B ×₃ C`` with ``A [heads, r1]``, ``B [head_dim, r2]``, ``C [hidden, r3]`` and core
``G [r1, r2, r3]``. Every factor is a plain bias-free ``nn.Linear`` (PEFT's LoRA can target ``core`` and
``factor_hidden`` like any linear); a mode kept at full rank is folded into the core (no extra matmul).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..registry import register_layer
from .common import linear_weight_and_bias

MODES = ("heads", "head_dim", "hidden")


def as_tensor3(weight: torch.Tensor, head_dim: int, heads_on: str) -> torch.Tensor:
    """``[out, in]`` weight -> ``[heads, head_dim, hidden]`` (heads split from the output or the input side)."""
    w = weight if heads_on == "out" else weight.t()
    return w.reshape(w.shape[0] // head_dim, head_dim, w.shape[1])


def _top_left(mat: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` left singular vectors of ``mat [n, k]`` (via the ``n × n`` Gram matrix), ``[n, r]``."""
    vals, vecs = torch.linalg.eigh(mat @ mat.T)
    return vecs[:, torch.argsort(vals, descending=True)[:r]]


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def tucker_params(shape: tuple[int, int, int], ranks: tuple[int, int, int]) -> int:
    """Weights of a :class:`TuckerLinear` with mode ranks ``ranks`` (bias excluded; full-rank modes folded)."""
    (h, d, n), (r1, r2, r3) = shape, ranks
    return r1 * r2 * r3 + n * r3 + (h * r1 if r1 < h else 0) + (d * r2 if r2 < d else 0)


def check_tucker_ranks(shape: tuple[int, int, int], ranks: tuple[int, int, int], who: str) -> None:
    """Reject ranks outside ``1..mode size`` and ranks larger than the product of the other two."""
    if len(ranks) != 3:
        raise ValueError(f"hf_compress: {who}: Tucker ranks are three (heads, head_dim, hidden), got {list(ranks)}.")
    for mode, size, r in zip(MODES, shape, ranks):
        if not isinstance(r, int) or r < 1 or r > size:
            raise ValueError(f"hf_compress: {who}: Tucker rank {r!r} for mode '{mode}' must be in 1..{size} "
                             f"(the mode's size). Use ranks <= {list(shape)}.")
    r1, r2, r3 = ranks
    if r1 > r2 * r3 or r2 > r1 * r3 or r3 > r1 * r2:
        raise ValueError(f"hf_compress: {who}: Tucker ranks {list(ranks)} are inconsistent (each must be <= the "
                         "product of the other two). Lower the largest rank.")


def choose_ranks(t: torch.Tensor, max_params: int | None = None, energy: float | None = None) -> tuple[int, int, int]:
    """Mode ranks for ``t [h, d, n]`` from the HOSVD core energies: the most energy within ``max_params``
    weights, or the fewest weights keeping ``energy`` (fraction of ``‖T‖²``)."""
    h, d, n = t.shape
    bases = [_top_left(_unfold(t, m), t.shape[m]) for m in range(3)]
    core = torch.einsum("hdn,hi,dj,nk->ijk", t, *bases)
    kept = (core**2).cumsum(0).cumsum(1).cumsum(2) / (t**2).sum().clamp_min(1e-300)  # [h, d, n]
    r1, r2, r3 = (torch.arange(1, s + 1, dtype=torch.float64) for s in (h, d, n))
    r1, r2, r3 = r1[:, None, None], r2[None, :, None], r3[None, None, :]
    params = r1 * r2 * r3 + n * r3 + torch.where(r1 < h, h * r1, 0) + torch.where(r2 < d, d * r2, 0)
    ok = (r1 <= r2 * r3) & (r2 <= r1 * r3) & (r3 <= r1 * r2)
    if max_params is not None:
        score = torch.where(ok & (params <= max_params), kept, -1.0)
    else:
        score = torch.where(ok & (kept >= energy - 1e-12), -params, -float("inf"))
    if max_params is not None and float(score.max()) < 0:
        raise ValueError(f"hf_compress: Tucker: no ranks of a {[h, d, n]} tensor fit max_params={max_params} (ranks "
                         f"(1, 1, 1) need {int(params[0, 0, 0])}); allow more parameters or give ranks.")
    best = int(torch.argmax(score.flatten()))
    return (best // (d * n) + 1, best // n % d + 1, best % n + 1)


def tucker(t: torch.Tensor, ranks: tuple[int, int, int], iters: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HOSVD initialised HOOI: ``t [h, d, n] ≈ core ×₁ A ×₂ B ×₃ C``; returns ``(core [r1, r2, r3], [A, B, C])``."""
    factors = [_top_left(_unfold(t, m), r) for m, r in enumerate(ranks)]
    for _ in range(iters):
        for m in range(3):
            proj = t
            for k in range(3):
                if k != m:
                    proj = torch.tensordot(proj, factors[k], dims=([k], [0])).movedim(-1, k)
            factors[m] = _top_left(_unfold(proj, m), ranks[m])
    core = torch.einsum("hdn,hi,dj,nk->ijk", t, *factors)
    return core, factors


@register_layer
class TuckerLinear(nn.Module):
    """Drop-in for an attention ``nn.Linear`` whose output (``heads_on="out"``, Q/K/V) or input
    (``heads_on="in"``, output projection) splits into ``heads × head_dim``.

    Sub-layers (bias-free ``nn.Linear``): ``factor_hidden`` (``hidden <-> r3``), ``core`` (``r3 <-> a·b``),
    ``factor_head_dim`` (``b <-> head_dim``, absent when ``r2 == head_dim``), ``factor_heads`` (``a <-> heads``,
    absent when ``r1 == heads``), where ``a = r1`` and ``b = r2``. ``bias [out_features]`` is a parameter.
    """

    layer_type = "tucker_linear"

    def __init__(self, in_features: int, out_features: int, head_dim: int, ranks: tuple[int, int, int] | list[int],
                 heads_on: str = "out", bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if heads_on not in ("out", "in"):
            raise ValueError(f"hf_compress: TuckerLinear.heads_on must be 'out' or 'in', got {heads_on!r}.")
        split, hidden = (out_features, in_features) if heads_on == "out" else (in_features, out_features)
        if head_dim < 1 or split % head_dim:
            raise ValueError(f"hf_compress: TuckerLinear: {heads_on}_features={split} is not a multiple of "
                             f"head_dim={head_dim}; pass the model's attention head size.")
        self.shape = (split // head_dim, head_dim, hidden)
        self.ranks = tuple(int(r) for r in ranks)
        check_tucker_ranks(self.shape, self.ranks, f"TuckerLinear({in_features}->{out_features})")
        self.in_features, self.out_features, self.heads_on = in_features, out_features, heads_on
        (h, d, n), (r1, r2, r3) = self.shape, self.ranks
        kw = {"bias": False, "device": device, "dtype": dtype}
        out = heads_on == "out"
        self.factor_hidden = nn.Linear(n, r3, **kw) if out else nn.Linear(r3, n, **kw)
        self.core = nn.Linear(r3, r1 * r2, **kw) if out else nn.Linear(r1 * r2, r3, **kw)
        self.factor_head_dim = None if r2 == d else (nn.Linear(r2, d, **kw) if out else nn.Linear(d, r2, **kw))
        self.factor_heads = None if r1 == h else (nn.Linear(r1, h, **kw) if out else nn.Linear(h, r1, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, d, _), (r1, r2, _) = self.shape, self.ranks
        lead = x.shape[:-1]
        if self.heads_on == "out":
            u = self.core(self.factor_hidden(x)).unflatten(-1, (r1, r2))  # [..., r1, r2]
            if self.factor_head_dim is not None:
                u = self.factor_head_dim(u)  # [..., r1, d]
            if self.factor_heads is not None:
                u = self.factor_heads(u.transpose(-1, -2)).transpose(-1, -2)  # [..., h, d]
            y = u.reshape(*lead, h * d)
        else:
            u = x.unflatten(-1, (h, d))
            if self.factor_head_dim is not None:
                u = self.factor_head_dim(u)  # [..., h, r2]
            if self.factor_heads is not None:
                u = self.factor_heads(u.transpose(-1, -2)).transpose(-1, -2)  # [..., r1, r2]
            y = self.factor_hidden(self.core(u.flatten(-2)))
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight (materialized on access; for inspection only)."""
        eye = torch.eye(self.in_features, dtype=self.core.weight.dtype, device=self.core.weight.device)
        y = self.forward(eye)
        return (y if self.bias is None else y - self.bias).T

    @classmethod
    def from_dense(cls, linear: nn.Module, head_dim: int, heads_on: str = "out",
                   ranks: tuple[int, int, int] | None = None, max_params: int | None = None,
                   energy: float | None = None, iters: int = 3) -> TuckerLinear:
        """Tucker-decompose (HOOI, float64) an ``nn.Linear``/``Conv1D``; give ``ranks`` or a selector
        (``max_params`` weights / ``energy`` fraction), see :func:`choose_ranks`."""
        weight, bias = linear_weight_and_bias(linear, "TuckerLinear.from_dense")
        out_f, in_f = weight.shape
        if heads_on not in ("out", "in"):
            raise ValueError(f"hf_compress: TuckerLinear.from_dense: heads_on must be 'out' or 'in', got {heads_on!r}.")
        if ranks is None and (max_params is None) == (energy is None):
            raise ValueError(f"hf_compress: TuckerLinear.from_dense({in_f}->{out_f}): give ranks=(r1, r2, r3), or "
                             "exactly one of max_params / energy to choose them.")
        split = out_f if heads_on == "out" else in_f
        if head_dim < 1 or split % head_dim:
            raise ValueError(f"hf_compress: TuckerLinear: {heads_on}_features={split} is not a multiple of "
                             f"head_dim={head_dim}; pass the model's attention head size.")
        t = as_tensor3(weight.detach().to(torch.float64), head_dim, heads_on)
        if energy is not None and not 0.0 < energy <= 1.0:
            raise ValueError(f"hf_compress: TuckerLinear.from_dense({in_f}->{out_f}): energy must be a fraction in "
                             f"(0, 1], got {energy!r}.")
        if ranks is None:
            ranks = choose_ranks(t, max_params=max_params, energy=energy)
        check_tucker_ranks(tuple(t.shape), tuple(ranks), f"TuckerLinear.from_dense({in_f}->{out_f})")
        core, (a, b, c) = tucker(t, tuple(ranks), iters=iters)
        layer = cls(in_f, out_f, head_dim, ranks, heads_on, bias is not None, weight.device, weight.dtype)
        layer.load_factors(core, a, b, c)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    @torch.no_grad()
    def load_factors(self, core: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
        """Fill the sub-layers from ``core [r1, r2, r3]``, ``a [h, r1]``, ``b [d, r2]``, ``c [n, r3]``."""
        if self.factor_heads is None:
            core, a = torch.einsum("ijk,hi->hjk", core, a), None
        if self.factor_head_dim is None:
            core, b = torch.einsum("ijk,dj->idk", core, b), None
        out = self.heads_on == "out"
        flat = core.reshape(-1, core.shape[-1])  # [a·b, r3]
        dt = self.core.weight.dtype
        self.core.weight.copy_((flat if out else flat.T).to(dt))
        self.factor_hidden.weight.copy_((c.T if out else c).to(dt))
        if b is not None:
            self.factor_head_dim.weight.copy_((b if out else b.T).to(dt))
        if a is not None:
            self.factor_heads.weight.copy_((a if out else a.T).to(dt))

    def spec(self) -> dict[str, Any]:
        return {"type": self.layer_type, "in_features": self.in_features, "out_features": self.out_features,
                "head_dim": self.shape[1], "ranks": list(self.ranks), "heads_on": self.heads_on,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TuckerLinear:
        return cls(spec["in_features"], spec["out_features"], spec["head_dim"], spec["ranks"], spec["heads_on"],
                   bias=spec["bias"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"shape={list(self.shape)}, ranks={list(self.ranks)}, heads_on={self.heads_on}")
