"""``hf-compress``: compress, evaluate, sweep, write model cards and push compressed models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .cli_inputs import (
    DEFAULT_PATTERN,
    CLIError,
    check_seq_len,
    checkpoint_dtype,
    dtype_arg,
    load_plan,
    positive_int,
    save_preprocessor,
    text_windows,
    tokenizer_of,
)

EXAMPLES = """examples:
  hf-compress compress HuggingFaceTB/SmolLM2-135M --config plan.json --out smollm2-compressed
  hf-compress compress ./dense-model --method low_rank --rank-ratio 0.5 --pattern 'self_attn\\.(q|k|v|o)_proj$' \\
      --out out
  hf-compress compress ./dense-model --budget 0.6 --out out         # searched mixed plan, 60% of the bytes
  hf-compress compress ./dense-model --budget 0.6 --calib-text news.txt --methods jlcm tt_embedding --out out
  hf-compress eval out --metric ppl --text my_eval.txt
  hf-compress card out
  hf-compress push out me/smollm2-compressed
  hf-compress sweep ./dense --patterns q_proj mlp.up_proj --ratios 0.25 0.5 --budget 0.9 --out plan.json
"""


def cmd_compress(args: argparse.Namespace) -> int:
    import transformers

    from .compress import compress
    from .config import CalibrationRequiredError
    from .modeling import auto_compressed_class, default_task

    plan = load_plan(args)
    config = transformers.AutoConfig.from_pretrained(args.model)
    task = args.task or default_task(config)
    model = auto_compressed_class(task).from_pretrained(args.model, dtype=dtype_arg(args.dtype or "float32"))
    if plan is None:
        model = _mixed_plan(model, args)
    else:
        calibration = text_windows(model, args)
        try:
            compress(model, plan, calibration=calibration)
        except CalibrationRequiredError as err:
            if calibration is None:
                raise CLIError(f"{err} With the CLI: pass --calib-text FILE (plain text for calibration).") from err
            raise
        if not (model.config.compression_config or {}).get("layers"):
            raise CLIError(f"the plan compressed no module of {type(model).__name__} (nothing saved); check its "
                           f"patterns (--pattern defaults to Llama-style {DEFAULT_PATTERN!r}) against "
                           "`[n for n, _ in model.named_modules()]`")
    out = Path(args.out)
    if args.dtype is None:  # computed in fp32, saved in the checkpoint's own dtype (a bf16 model stays bf16)
        model.to(checkpoint_dtype(config))
    model.save_pretrained(out)
    save_preprocessor(args.model, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {type(model).__name__} ({n:,} parameters) to {out}")
    return 0


def _mixed_plan(model: Any, args: argparse.Namespace) -> Any:
    """``--budget``: a mixed-method plan keeping ``budget`` of the dense bytes, searched by
    :func:`hf_compress.plan` from measured per-group sensitivity (TT embeddings, product twins, whitened low-rank,
    codebooks), scored on held-out batches: perplexity of ``--calib-text`` windows, or output error vs the dense
    model on random inputs. Prints the sensitivity table and returns the compressed model."""
    from . import sweep as sw
    from .planning import plan

    if not 0.0 < args.budget < 1.0:
        raise CLIError(f"--budget must be a fraction of the dense model's bytes to keep in (0, 1), got {args.budget}")
    eval_fn = None
    batches = text_windows(model, args)
    if batches is not None:
        if len(batches) < 2:
            raise CLIError(f"--calib-text {args.calib_text} is too short: need at least 2 windows of {args.seq_len} "
                           "tokens")
        fit, held = batches[: -max(1, len(batches) // 4)], batches[-max(1, len(batches) // 4):]
    else:
        check_seq_len(model, args.seq_len)
        fit = sw.random_batches(model, args.n_batches, args.seq_len, seed=1)
        held = sw.random_batches(model, max(1, args.n_batches // 4), args.seq_len, seed=2)
        eval_fn = sw.output_error_fn(model, held)
    result = plan(model, {"size": args.budget}, fit, eval_batches=held, eval_fn=eval_fn, methods=args.methods,
                  keep_model=True, progress=True)
    print(result.format_table())
    if args.plan_out:
        result.to_json(args.plan_out)
        print(f"wrote plan and table {args.plan_out}")
    return result.model


def cmd_eval(args: argparse.Namespace) -> int:
    import transformers

    from .modeling import auto_compressed_class, default_task

    config = transformers.AutoConfig.from_pretrained(args.model)
    model = auto_compressed_class(default_task(config)).from_pretrained(args.model)
    if args.metric == "ppl" and default_task(config) != "causal-lm":
        raise CLIError(f"--metric ppl scores a causal language model; {type(model).__name__} is not one (use "
                       "--metric encoder or --metric wer)")
    if args.text and args.metric != "ppl":
        raise CLIError(f"--text is the perplexity text: it does not apply to --metric {args.metric}")
    if args.metric == "ppl" and args.text:  # the benchmarks' sliding-window metric, no repository needed
        from .evaluation import PPL_BUDGETS, perplexity

        tok = tokenizer_of(args.model, "--metric ppl --text")
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions",
                                                                                          None)
        settings = dict(PPL_BUDGETS[args.budget])
        if positions and settings["window"] > positions:  # a model with fewer positions than the window
            settings["window"] = settings["stride"] = positions
        result = perplexity(model, tok, Path(args.text).read_text(), **settings)
    else:
        import os

        if os.getcwd() not in sys.path:  # the console script does not put the clone on sys.path
            sys.path.insert(0, os.getcwd())
        try:
            from benchmarks import harness
        except ImportError as err:
            raise CLIError("`eval` without --text needs the repository's `benchmarks` package and data (run it in the "
                           "root of a clone of the hf_compress repository), or pass --metric ppl --text FILE") from err
        kind = {"ppl": "causal-lm", "wer": "speech-seq2seq", "encoder": "encoder"}[args.metric]
        tok = (transformers.AutoProcessor if kind == "speech-seq2seq" else transformers.AutoTokenizer).from_pretrained(
            args.model)
        result = harness.quality(model, tok, kind, budget=args.budget)
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    import transformers

    from .cards import model_card
    from .modeling import auto_compressed_class, default_task
    from .saving import save_card

    config = transformers.AutoConfig.from_pretrained(args.model)
    if not getattr(config, "compression_config", None):
        raise CLIError(f"{args.model} is not an hf_compress checkpoint (config.json has no compression_config)")
    model = auto_compressed_class(default_task(config)).from_pretrained(args.model)
    card = model_card(model, repo_id=args.repo_id)
    out = Path(args.out) if args.out else Path(args.model) / "README.md"
    save_card(card, out)
    print(f"wrote {out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .saving import _hub_card, _own_card, _write_card, create_hub_repo, upload_folder

    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise CLIError(f"{folder} is not a saved model folder (no config.json); run `hf-compress compress` first")
    # without --private the Hub's default applies (an organisation may make new repos private)
    repo_id = create_hub_repo(args.repo_id, private=True if args.private else None, token=args.token)
    generated = _own_card(folder)  # no card, or hf_compress's (a card you wrote in the folder is uploaded as is)
    hub_kept = generated and _hub_card(repo_id, args.token) is not None  # a card written on the Hub is kept
    if generated and not hub_kept:  # the generated card names the repo pushed to (it said "path/to/this/model")
        import transformers

        from .modeling import auto_compressed_class, default_task

        config = transformers.AutoConfig.from_pretrained(folder)
        _write_card(auto_compressed_class(default_task(config)).from_pretrained(folder), folder, repo_id)
    keep_hub_card = {"ignore_patterns": ["README.md"]} if hub_kept else {}
    result = upload_folder(folder, repo_id, token=args.token, **keep_hub_card)
    print(f"pushed {folder} to {repo_id}: {result}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import transformers

    from . import sweep as sw
    from .modeling import auto_compressed_class, default_task

    if (args.budget is None) == (args.quality_budget is None):
        raise CLIError("give exactly one of --budget FRACTION (parameters kept) or --quality-budget RATIO")
    if args.quality_budget is not None and args.metric == "output":
        raise CLIError("--quality-budget is a ratio to the dense quality, but the dense model's output error is 0; "
                       "use --metric ppl --text FILE with it, or a --budget")
    config = transformers.AutoConfig.from_pretrained(args.model)
    model = auto_compressed_class(args.task or default_task(config)).from_pretrained(args.model).eval()
    tok = None
    check_seq_len(model, args.seq_len)
    if args.text or args.metric == "ppl":
        tok = tokenizer_of(args.model, "--text/--metric ppl")
    if args.metric == "ppl" and not args.text:
        raise CLIError("--metric ppl needs --text FILE (evaluation text)")
    probe = (sw.text_batches(tok, Path(args.text).read_text(), args.n_batches, args.seq_len) if args.text
             else sw.random_batches(model, args.n_batches, args.seq_len, seed=1))
    calib = text_windows(model, args) or sw.random_batches(model, args.n_batches, args.seq_len, seed=2)
    eval_fn = sw.perplexity_fn(probe) if args.metric == "ppl" else sw.output_error_fn(model, probe)
    budget = {"params": args.budget} if args.budget is not None else {"quality": args.quality_budget}
    result = sw.sweep(model, args.patterns, args.ratios, calibration=calib, eval_fn=eval_fn, budget=budget,
                      method=args.method, group_by=args.group_by, progress=False)
    print(result.format_table())
    chosen = result.chosen
    if chosen.get("budget_met") is False:
        raise CLIError(f"--budget {args.budget} is out of reach of these candidates: the smallest plan keeps "
                       f"{chosen['params_ratio']:.3f} of the parameters (no plan written); add --patterns or "
                       "smaller --ratios")
    print(f"chosen: params {chosen['params']:,} ({chosen['params_ratio']:.3f} of dense), {args.metric} "
          f"{chosen['quality']:.4g} (dense {result.dense['quality']:.4g}); {chosen['groups']}")
    result.config.to_json(args.out)
    print(f"wrote plan {args.out}")
    if args.table:
        result.to_json(args.table)
        print(f"wrote table {args.table}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-compress", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model (Hub id or folder) and save it")
    p.add_argument("model", help="Hub id or local folder of a dense (or compressed) model")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="CompressionConfig JSON file")
    p.add_argument("--method", help="single-method plan: method name, e.g. low_rank")
    p.add_argument("--pattern", default=DEFAULT_PATTERN,
                   help="module pattern for --method (default: Llama-style attention projections)")
    p.add_argument("--rank", type=int)
    p.add_argument("--rank-ratio", type=float)
    p.add_argument("--param", action="append", help="extra method parameter KEY=VALUE (JSON value)")
    p.add_argument("--budget", type=float,
                   help="fraction of the dense bytes (floats at 2 bytes) to keep: searches a mixed-method plan with "
                        "hf_compress.plan from measured per-module sensitivity and prints its table")
    p.add_argument("--methods", nargs="+", help="--budget: only these methods (e.g. low_rank jlcm tt_embedding "
                                                "product_twin); default all")
    p.add_argument("--calib-text", help="text file for calibration: plans whose methods read activations (whitened, "
                                        "asvd, jlcm, gptq ...) and --budget (also its held-out perplexity; "
                                        "default there: random inputs scored by output error)")
    p.add_argument("--n-batches", type=positive_int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=positive_int, default=64, help="tokens per calibration window")
    p.add_argument("--plan-out", help="--budget: also write the plan, table and search path as JSON")
    p.add_argument("--task", help="head: causal-lm, speech-seq2seq, base, masked-lm, sequence-classification")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"],
                   help="load, compress and save in this dtype ('auto': the checkpoint's). Default: compress in "
                        "float32, save in the checkpoint's dtype (a bf16 model stays bf16)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="measure quality of a saved model")
    p.add_argument("model")
    p.add_argument("--metric", choices=["ppl", "wer", "encoder"], required=True)
    p.add_argument("--text", help="plain-text file for perplexity (default: the benchmark eval text)")
    p.add_argument("--budget", choices=["default", "quick"], default="default")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("card", help="(re)write the model card README.md of a saved compressed model")
    p.add_argument("model")
    p.add_argument("--repo-id", help="Hub repo id to show in the load instructions")
    p.add_argument("--out", help="card path (default: MODEL/README.md)")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("push", help="upload a saved compressed model folder to the Hub")
    p.add_argument("model")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true", help="create the repo private (default: the Hub's default)")
    p.add_argument("--token")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("sweep", help="per-layer sensitivity + budgeted search for a low-rank plan (JSON)")
    p.add_argument("model", help="Hub id or local folder of a dense model")
    p.add_argument("--patterns", nargs="+", required=True, help="candidate module patterns (one group each)")
    p.add_argument("--ratios", type=float, nargs="+", required=True, help="candidate rank_ratio values")
    p.add_argument("--budget", type=float, help="fraction of the model's parameters to keep, e.g. 0.91")
    p.add_argument("--quality-budget", type=float, help="allowed quality ratio vs dense, e.g. 1.05")
    p.add_argument("--method", default="svd", choices=["svd", "whitened", "asvd", "tucker"])
    p.add_argument("--metric", default="output", choices=["output", "ppl"],
                   help="output: relative output error vs dense (no tokenizer needed); ppl: perplexity of --text")
    p.add_argument("--text", help="evaluation text file (probe inputs)")
    p.add_argument("--calib-text", help="calibration text file for whitened/asvd (default: random inputs)")
    p.add_argument("--n-batches", type=positive_int, default=4)
    p.add_argument("--seq-len", type=positive_int, default=64)
    p.add_argument("--group-by", default="pattern", choices=["pattern", "module"])
    p.add_argument("--task", help="head: causal-lm, speech-seq2seq, base, ...")
    p.add_argument("--out", required=True, help="where to write the chosen CompressionConfig JSON")
    p.add_argument("--table", help="also write the full sweep result (table, path, Pareto points) as JSON")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, OSError) as err:
        print(f"hf-compress: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
