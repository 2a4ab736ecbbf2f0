"""Compress a model on load, save it, reload it with plain transformers, and (optionally) push it to the Hub.

    python examples/compress_and_push.py HuggingFaceTB/SmolLM2-135M --out smollm2-lowrank --rank-ratio 0.75
    python examples/compress_and_push.py ./my-dense-model --out out --repo-id me/my-model-lowrank   # also pushes

Works for any supported causal LM (Llama/GQA, Mistral, Qwen2/3, Gemma-3, GPT-2): the attention projections are
replaced by rank-r factor pairs (truncated SVD, no retraining).
"""

from __future__ import annotations

import argparse

import torch
import transformers

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig

ATTENTION = r"(self_attn\.(q|k|v|o)_proj|attn\.(c_attn|c_proj))$"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Hub id or local folder of a dense causal LM")
    parser.add_argument("--out", required=True, help="where to save the compressed model")
    parser.add_argument("--rank-ratio", type=float, default=0.75, help="fraction of each projection's parameters kept")
    parser.add_argument("--repo-id", help="push the compressed model to this Hub repo")
    args = parser.parse_args(argv)

    plan = CompressionConfig(modules={ATTENTION: LowRankConfig(rank_ratio=args.rank_ratio)})
    model = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(args.model, compression_config=plan)
    model.save_pretrained(args.out)
    again = transformers.AutoModelForCausalLM.from_pretrained(args.out)
    ids = torch.arange(8).unsqueeze(0) % model.config.vocab_size
    with torch.inference_mode():
        same = torch.equal(model(ids).logits, again(ids).logits)
    dense = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(args.model).parameters())
    n = sum(p.numel() for p in again.parameters())
    print(f"saved {args.out}: {n:,} parameters ({n / dense:.3f} of dense {dense:,}); reload identical: {same}")
    if args.repo_id:
        print(model.push_to_hub(args.repo_id))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
