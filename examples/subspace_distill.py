"""Subspace token embeddings (a few shared tables instead of one row per token), then a short distillation.

    python examples/subspace_distill.py --model smollm2-135m --steps 200 --out smollm2-subspace   # benchmarks.zoo
    python examples/subspace_distill.py --model ./my-llama --text calib.txt --steps 20 --out out

``--model``: a local folder, a Hub id or a ``benchmarks.zoo`` name. The embedding becomes ``--num-subspaces``
tables (``assignment="context"``: codes from product quantization of the pretrained table); then
``hf_compress.methods.subspace.distill`` trains only the tables with ``transformers.Trainer`` so the student's
hidden states (and logits, the head being tied) match the dense teacher on ``--text`` windows. Saves, reloads with
plain transformers and checks the logits are identical.
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from _common import calibration_text, load_causal_lm, token_windows

import hf_compress
from hf_compress import CompressionConfig, SubspaceEmbeddingConfig
from hf_compress.methods.subspace import distill


def windows(tok: Any, path: str | None, n: int, seq_len: int) -> list[torch.Tensor]:
    """``n`` consecutive windows ``[1, seq_len]`` of token ids from ``path`` (default: the calibration text)."""
    return token_windows(tok, Path(path).read_text() if path else calibration_text(), n, seq_len)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="folder, Hub id or benchmarks.zoo name")
    parser.add_argument("--text", help="distillation text file (default: the benchmark calibration text)")
    parser.add_argument("--num-subspaces", type=int, default=2, help="tables per token (f)")
    parser.add_argument("--param-fraction", type=float, help="rows per table as a fraction of the vocabulary")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-samples", type=int, default=64, help="distillation windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--isolated-tokens", type=int, default=0, help="also distill this many vocabulary tokens "
                        "per step, each on its own (reaches tokens the text never shows)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    teacher, tok = load_causal_lm(args.model)
    student = copy.deepcopy(teacher)
    batches = windows(tok, args.text, args.n_samples, args.seq_len)
    embed = next(n for n, m in student.named_modules() if m is student.get_input_embeddings())
    dense_params = student.get_input_embeddings().weight.numel()
    method = SubspaceEmbeddingConfig(num_subspaces=args.num_subspaces, assignment="context",
                                     param_fraction=args.param_fraction)
    hf_compress.compress(student, CompressionConfig(modules={re.escape(embed) + "$": method}), calibration=batches,
                         progress=False)
    stats = distill(student, teacher, batches, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                    progress=False, isolated_tokens=args.isolated_tokens, tokenizer=tok)
    student.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    again = transformers.AutoModelForCausalLM.from_pretrained(args.out).eval()
    with torch.inference_mode():
        same = torch.equal(again(batches[0]).logits, student.eval()(batches[0]).logits)
    params = sum(p.numel() for p in student.get_input_embeddings().parameters())
    print(f"embedding {dense_params:,} -> {params:,} parameters ({stats['trainable_params']:,} trained, "
          f"{stats['train_s']:.1f} s)")
    print(f"distillation loss ({stats['loss']}): {stats['loss_before']:.4f} -> {stats['loss_after']:.4f}")
    print(f"saved {args.out}; reload identical: {same}")
    return 0 if same and stats["loss_after"] <= stats["loss_before"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
