"""``python -m benchmarks baselines``: dense quality, size and latency of every zoo model, one JSON record each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .harness import Bench, latency, quality, size


def run_baselines(models: list[str], budget: str = "default", out: str | None = None) -> Path:
    """Measure each zoo model dense with the fixed ``budget``; writes ``results/baselines.json`` (or ``out``)."""
    from . import zoo

    bench = Bench("baselines", budget=budget, description="dense zoo models: quality, size, latency")
    for name in models:
        print(f"[benchmarks] dense baseline {name}", flush=True)
        kind = zoo.ZOO[name].kind
        model, tok = zoo.load(name)
        rec: dict[str, Any] = bench.record(name, "dense", quality=quality(model, tok, kind, budget),
                                           size=size(model), latency=latency(model, kind, budget),
                                           extra={"source": zoo.ZOO[name].note})
        print(f"  {name}: {rec['quality']}", flush=True)
        del model
    return bench.save(Path(out) if out else None)
