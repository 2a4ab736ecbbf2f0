"""Tensor-train token embeddings, then prune the vocabulary to the tokens a text uses (model, head and tokenizer).

    python examples/tt_vocab_prune.py --model smollm2-135m --out smollm2-tt-pruned          # benchmarks.zoo name
    python examples/tt_vocab_prune.py --model ./my-llama --text domain.txt --compression 4 --out out

``--model``: a local folder, a Hub id or a ``benchmarks.zoo`` name; ``--text``: the text whose tokens are kept
(default: the benchmark's evaluation text). Special tokens and single-character tokens (the byte alphabet of
byte-level BPE) are always kept, so any text still tokenizes. Saves model + tokenizer, reloads them with plain
transformers and checks the logits are identical and that pruning changed no kept token's logit.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import transformers
from _common import eval_text, load_causal_lm

import hf_compress
from hf_compress import CompressionConfig, TTEmbeddingConfig
from hf_compress.vocab import keep_tokens


def read_text(path: str | None, max_chars: int) -> str:
    return (Path(path).read_text() if path else eval_text())[:max_chars]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="folder, Hub id or benchmarks.zoo name")
    parser.add_argument("--text", help="text file whose tokens are kept (default: the benchmark eval text)")
    parser.add_argument("--max-chars", type=int, default=20000, help="use the first N characters of the text")
    parser.add_argument("--compression", type=float, default=4.0, help="embedding parameters / TT parameters")
    parser.add_argument("--format", default="adaptive", help="TT format: adaptive, per_token, tt_matrix, svd")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    model, tok = load_causal_lm(args.model)
    text = read_text(args.text, args.max_chars)
    ids = torch.tensor([tok(text)["input_ids"]])  # [1, T]
    embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    plan = CompressionConfig(modules={re.escape(embed) + "$": TTEmbeddingConfig(format=args.format,
                                                                                compression=args.compression)})
    hf_compress.compress(model, plan, calibration=[ids], progress=False)  # token counts steer the TT ranks
    window = ids[:, :256]
    with torch.inference_mode():
        before = model(window).logits  # [1, t, V]

    v_old = model.get_input_embeddings().num_embeddings
    keep = set(ids.flatten().tolist()) | {i for t, i in tok.get_vocab().items() if len(t) == 1 or t in
                                          tok.all_special_tokens}
    for cfg in (model.config, model.generation_config):
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(cfg, field, None)
            keep |= {value} if isinstance(value, int) else set(value or [])
    # keep_tokens also keeps the BPE merge parts of every kept token, so the text tokenizes as before
    old_to_new = keep_tokens(model, tok, sorted(i for i in keep if 0 <= i < v_old))
    new_window = torch.tensor([tok(text)["input_ids"]])[:, :256]
    if not torch.equal(new_window, old_to_new[window]):
        raise SystemExit("tokenization after pruning differs from the remapped ids")
    with torch.inference_mode():
        after = model(new_window).logits
    kept = old_to_new >= 0
    drift = (after - before[..., kept]).abs().max().item()  # the same logits for every kept token

    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    again = transformers.AutoModelForCausalLM.from_pretrained(args.out).eval()
    tok2 = transformers.AutoTokenizer.from_pretrained(args.out)
    with torch.inference_mode():
        same = torch.equal(again(new_window).logits, after) and tok2(text)["input_ids"] == tok(text)["input_ids"]
    params = sum(p.numel() for p in model.get_input_embeddings().parameters())
    print(f"vocabulary {v_old} -> {int(kept.sum())} tokens; embedding {v_old * model.config.hidden_size:,} -> "
          f"{params:,} parameters; kept-token logit drift {drift:.2e}")
    print(f"saved {args.out} ({(Path(args.out) / 'model.safetensors').stat().st_size:,} bytes); "
          f"reload identical: {same}")
    return 0 if same and drift < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
