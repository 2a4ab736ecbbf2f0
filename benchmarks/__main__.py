"""Benchmark CLI: ``python -m benchmarks run|plot|list``."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  python -m benchmarks run --model smollm2-135m                      # default plan, dense vs compressed
  python -m benchmarks run --model whisper-tiny.en --preset lowrank-attn-0.5
  python -m benchmarks run --model smollm2-135m --config plan.json --budget quick
  python -m benchmarks baselines --models smollm2-135m minilm-l6     # dense rows only
  python -m benchmarks plot                                          # PNGs for every results JSON
  python -m benchmarks list                                          # models and presets
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure dense and compressed in the same run")
    run.add_argument("--model", required=True, help="zoo name (see `list`)")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--config", help="CompressionConfig JSON file")
    group.add_argument("--preset", help="named plan (see `list`)")
    run.add_argument("--budget", default="default", choices=["default", "quick"])
    run.add_argument("--save-dir", help="where to save the compressed model (default: a temp dir)")
    run.add_argument("--out", help="results JSON path (default: benchmarks/results/run-<model>-<plan>.json)")
    run.add_argument("--no-memory", action="store_true", help="skip the compress-on-load memory probe")
    base = sub.add_parser("baselines", help="dense quality/size/latency of zoo models -> results/baselines.json")
    base.add_argument("--models", nargs="+", default=None, help="zoo names (default: all)")
    base.add_argument("--budget", default="default", choices=["default", "quick"])
    base.add_argument("--out", help="results JSON path")
    suite = sub.add_parser("suite", help="run a method's benchmark suite (benchmarks/suites/NAME.py)")
    suite.add_argument("name", help="suite name (see `list`)")
    suite.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the suite")
    sub.add_parser("plot", help="draw PNG trade-off plots for every results JSON")
    sub.add_parser("list", help="list zoo models and presets")
    sub.add_parser("table", help="write the results table into benchmarks/README.md")
    args = parser.parse_args(argv)

    if args.command == "plot":
        from .plot import plot_all

        for path in plot_all():
            print(path)
        return 0
    if args.command == "table":
        from .report import write_readme

        print(write_readme())
        return 0
    from . import runner, suites, zoo

    if args.command == "suite":
        if args.name not in suites.available():
            parser.error(f"unknown suite {args.name!r}; choose from {', '.join(suites.available())}")
        from importlib import import_module

        return int(import_module(f"benchmarks.suites.{args.name}").main(args.args) or 0)

    if args.command == "list":
        print("models:", ", ".join(zoo.ZOO))
        print("presets:", ", ".join(runner.PRESETS), f"(default {runner.DEFAULT_PRESET})")
        print("suites:", ", ".join(suites.available()))
        return 0
    if args.command == "baselines":
        from .baselines import run_baselines

        unknown = [m for m in args.models or [] if m not in zoo.ZOO]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; choose from {', '.join(zoo.ZOO)}")
        print(run_baselines(args.models or list(zoo.ZOO), budget=args.budget, out=args.out))
        return 0
    from hf_compress import CompressionConfig

    if args.model not in zoo.ZOO:
        parser.error(f"unknown model {args.model!r}; choose from {', '.join(zoo.ZOO)}")
    if args.config:
        plan, label = CompressionConfig.from_json(args.config), args.config.rsplit("/", 1)[-1].removesuffix(".json")
    else:
        label = args.preset or runner.DEFAULT_PRESET
        if label not in runner.PRESETS:
            parser.error(f"unknown preset {label!r}; choose from {', '.join(runner.PRESETS)}")
        plan = runner.PRESETS[label](runner.kind_of(args.model))
    runner.run(args.model, plan, label, budget=args.budget, save_dir=args.save_dir,
               measure_memory=not args.no_memory, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
