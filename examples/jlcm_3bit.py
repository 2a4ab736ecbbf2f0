"""JLCM codebook quantization at 3 bits per weight; save (indices stored as packed 3-bit codes) and report bytes.

    python examples/jlcm_3bit.py --model smollm2-135m --out smollm2-jlcm3            # benchmarks.zoo name
    python examples/jlcm_3bit.py --model ./my-llama --text calib.txt --steps 10 --out out
    python examples/jlcm_3bit.py --model smollm2-135m --finetune-seconds 900 --out smollm2-jlcm3-ft

``--model``: a local folder, a Hub id or a ``benchmarks.zoo`` name. Calibration windows come from ``--text``
(default: the benchmark calibration text); JLCM fits codebooks and mappings to each layer's outputs on them.
Prints bytes on disk, the index bits per weight, the held-out loss of the dense and the quantized model, and checks
that the saved model reloads with plain transformers to identical logits. ``--finetune-seconds S`` then distils the
codebooks, scales, norms and biases toward the dense model on the calibration windows for ``S`` seconds
(``hf_compress.healing.distill_logits``; indices fixed, same bytes) before saving.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
import transformers
from _common import calibration_text, load_causal_lm, token_windows

import hf_compress
from hf_compress import CodebookConfig, CompressionConfig
from hf_compress.healing import distill_logits
from hf_compress.layers.codebook import CodebookLinear
from hf_compress.methods.jlcm import freeze_codebooks, mark_codebooks_trainable

LINEARS = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$"


def windows(tok: Any, path: str | None, n: int, seq_len: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``n`` calibration windows ``[1, seq_len]`` and one held-out window ``[1, seq_len]`` (after them)."""
    text = Path(path).read_text() if path else calibration_text()
    chunks = token_windows(tok, text, n + 1, seq_len, need="(n_samples + 1) * seq_len")
    return chunks[:n], chunks[n]


@torch.inference_mode()
def loss(model: Any, ids: torch.Tensor) -> float:
    return float(model(ids, labels=ids).loss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="folder, Hub id or benchmarks.zoo name")
    parser.add_argument("--text", help="calibration text file (default: the benchmark calibration text)")
    parser.add_argument("--bits", type=int, default=3, help="index bits per weight")
    parser.add_argument("--pattern", default=LINEARS, help="regex of the linear layers to quantize")
    parser.add_argument("--steps", type=int, default=30, help="JLCM joint optimization steps per layer")
    parser.add_argument("--n-samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--finetune-seconds", type=float, default=0.0,
                        help="after quantizing: distil codebooks/scales/norms toward the dense model this long")
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    model, tok = load_causal_lm(args.model)
    calibration, held_out = windows(tok, args.text, args.n_samples, args.seq_len)
    dense_loss = loss(model, held_out)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = CompressionConfig(modules={args.pattern: CodebookConfig(bits=args.bits, steps=args.steps)})
    dense = copy.deepcopy(model) if args.finetune_seconds > 0 else None
    hf_compress.compress(model, plan, calibration=calibration)
    if dense is not None:
        print(f"held-out loss before fine-tuning: {loss(model, held_out):.4f}")
        mark_codebooks_trainable(model)
        stats = distill_logits(model, dense, calibration, max_steps=100_000, max_seconds=args.finetune_seconds,
                               batch_size=min(4, len(calibration)), learning_rate=args.finetune_lr)
        freeze_codebooks(model)
        print(f"fine-tuned {stats['trainable_params']:,} parameters for {stats['steps']} steps ({stats['seconds']} s)")
    model.save_pretrained(args.out)

    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    index_bytes = sum(m.indices.numel() for m in layers)  # uint8 buffers holding the packed codes
    disk = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    again = transformers.AutoModelForCausalLM.from_pretrained(args.out).eval()
    with torch.inference_mode():
        same = torch.equal(again(held_out).logits, model(held_out).logits)
    print(f"{len(layers)} layers, {weights:,} weights at {8 * index_bytes / weights:.3f} index bits/weight "
          f"({index_bytes:,} bytes of packed codes)")
    print(f"on disk: {disk:,} bytes vs {dense_bytes:,} dense parameter bytes ({disk / dense_bytes:.3f})")
    print(f"held-out loss: dense {dense_loss:.4f}, {args.bits}-bit JLCM {loss(model, held_out):.4f}")
    print(f"saved {args.out}; reload identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
