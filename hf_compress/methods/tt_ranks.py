"""TT shapes and ranks (used by :mod:`hf_compress.methods.tt_embedding`): factorizing ``d`` and ``V``, parameter
counts, the ranks TT-SVD can fill, and the largest ranks within a parameter budget."""

from __future__ import annotations

import itertools
import math

from ..config import BudgetError


def factorize(n: int, order: int) -> list[int]:
    """Split ``n`` into ``order`` factors as equal as possible (ascending), e.g. 576 -> [8, 8, 9]."""
    best: list[int] | None = None

    def search(rest: int, k: int, lo: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            if rest >= lo:
                cand = [*acc, rest]
                if best is None or max(cand) - min(cand) < max(best) - min(best):
                    best = cand
            return
        f = lo
        while f ** k <= rest:
            if rest % f == 0:
                search(rest // f, k - 1, f, [*acc, f])
            f += 1

    search(n, order, 2 if n >= 2 ** order else 1, [])
    return best or [n] + [1] * (order - 1)


def tt_params(shape: list[int], ranks: list[int], lead: list[int] | None = None) -> int:
    """Parameters of one TT with modes ``shape`` (times ``lead`` per mode, for TT-matrices) and inner ``ranks``."""
    full = [1, *ranks, 1]
    sizes = [n * (lead[k] if lead else 1) for k, n in enumerate(shape)]
    return sum(full[k] * sizes[k] * full[k + 1] for k in range(len(shape)))


def max_ranks(modes: list[int]) -> list[int]:
    return [min(math.prod(modes[: k + 1]), math.prod(modes[k + 1:])) for k in range(len(modes) - 1)]


def reachable_ranks(modes: list[int], ranks: list[int]) -> list[int]:
    """``ranks`` lowered to what TT-SVD can fill: ``r_k <= r_{k-1}·n_k`` and ``r_k <= n_{k+1}·r_{k+1}``
    (``r_0 = r_N = 1``). A rank above these bounds only adds zero slices (parameters that are always 0)."""
    out = list(ranks)
    for k in range(len(out)):
        out[k] = min(out[k], (out[k - 1] if k else 1) * modes[k])
    for k in reversed(range(len(out))):
        out[k] = min(out[k], modes[k + 1] * (out[k + 1] if k + 1 < len(out) else 1))
    return out


def check_reachable(modes: list[int], ranks: list[int], who: str) -> None:
    """Raise a clear ``ValueError`` if some TT rank exceeds what its neighbours allow (see :func:`reachable_ranks`)."""
    fit = reachable_ranks(modes, ranks)
    if fit != list(ranks):
        raise ValueError(f"hf_compress: {who}: TT ranks {list(ranks)} over modes {list(modes)} cannot all be "
                         f"filled (r_k <= r_(k-1)·n_k and r_k <= n_(k+1)·r_(k+1)); the extra slices would be stored "
                         f"as zeros. Use ranks {fit}.")


def choose_tt_ranks(modes: list[int], budget: float, who: str) -> list[int]:
    """Largest-parameter TT ranks (most balanced on ties) whose TT over ``modes`` fits ``budget`` parameters, among
    ranks TT-SVD can fill (:func:`reachable_ranks`)."""
    limits = max_ranks(modes)
    if not limits:
        return []
    if math.prod(limits) <= 200_000:
        candidates = itertools.product(*[range(1, m + 1) for m in limits])
    else:  # uniform ranks (capped per mode) for large TT-matrices
        candidates = ([min(r, m) for m in limits] for r in range(1, max(limits) + 1))
    best, best_key = None, None
    for ranks in candidates:
        p = tt_params(modes, list(ranks))
        if p <= budget and reachable_ranks(modes, list(ranks)) == list(ranks):
            key = (p, -(max(ranks) - min(ranks)))
            if best_key is None or key > best_key:
                best, best_key = list(ranks), key
    if best is None:
        raise BudgetError(f"hf_compress: {who}: even TT ranks of 1 exceed the parameter budget {budget:.0f}; "
                          "lower the compression ratio.")
    return best


def vocab_factors(v: int, order: int) -> list[int]:
    base = math.ceil(v ** (1.0 / order))
    first = [base] * (order - 1)
    return [*first, math.ceil(v / math.prod(first))]
