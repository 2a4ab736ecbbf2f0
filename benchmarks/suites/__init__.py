"""Per-method benchmark suites: ``python -m benchmarks suite NAME [args]`` runs ``benchmarks.suites.NAME.main(args)``.

Each suite measures dense and compressed settings of real zoo models in one run through
:class:`benchmarks.harness.Bench` and writes ``benchmarks/results/<suite>.json``
(``python -m benchmarks plot`` draws it).
"""

import pkgutil


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))  # _x: helpers
