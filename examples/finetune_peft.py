"""Fine-tune a compressed model with ``transformers.Trainer`` and PEFT LoRA on its low-rank factors.

    python examples/finetune_peft.py --model HuggingFaceTB/SmolLM2-135M --text my_corpus.txt --steps 200 --out out
    python examples/finetune_peft.py --model smollm2-135m --out out       # benchmarks.zoo name, benchmark texts

``--model``: a local folder, a Hub id or a ``benchmarks.zoo`` name. The attention and MLP projections are
compressed on load (truncated SVD into ``down``/``up`` factor pairs, read layer by layer from the checkpoint); LoRA
adapters target those factors, the compressed base stays frozen. Writes ``out/base`` (compressed model),
``out/adapter`` (a standard PEFT adapter) and ``out/merged`` (adapter merged into the factors: same size as the
base), reloads adapter and merged model with plain transformers + PEFT and checks their logits.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import transformers
from _common import calibration_text, eval_text, resolve
from peft import LoraConfig, PeftModel, get_peft_model

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig

PROJECTIONS = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"


def texts(path: str | None) -> tuple[str, str]:
    """(training text, held-out text): ``path`` split 90/10, or the benchmark calibration / evaluation texts."""
    if path:
        text = Path(path).read_text()
        return text[: int(0.9 * len(text))], text[int(0.9 * len(text)):]
    return calibration_text(), eval_text()


def chunks(tok: Any, text: str, seq_len: int, limit: int) -> list[dict[str, torch.Tensor]]:
    """Causal-LM examples: up to ``limit`` consecutive windows of ``seq_len`` tokens (labels = inputs)."""
    ids = torch.tensor(tok(text)["input_ids"])
    n = min(limit, ids.numel() // seq_len)
    if n == 0:
        raise SystemExit(f"a text part has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}; "
                         "give a longer --text or a smaller --seq-len")
    return [{"input_ids": w, "labels": w} for w in ids[: n * seq_len].view(n, seq_len)]


@torch.inference_mode()
def loss(model: Any, data: list[dict[str, torch.Tensor]]) -> float:
    ids = torch.stack([d["input_ids"] for d in data])
    return float(model(input_ids=ids, labels=ids).loss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="folder, Hub id or benchmarks.zoo name")
    parser.add_argument("--text", help="training text file, last 10%% held out (default: the benchmark texts)")
    parser.add_argument("--rank-ratio", type=float, default=0.5, help="fraction of each projection's parameters")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-examples", type=int, default=512)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)

    path = resolve(args.model)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    plan = CompressionConfig(modules={PROJECTIONS: LowRankConfig(rank_ratio=args.rank_ratio)})
    model = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(path, compression_config=plan)
    model.save_pretrained(out / "base")
    n_base = sum(p.numel() for p in model.parameters())
    train_text, eval_text = texts(args.text)
    train, held_out = chunks(tok, train_text, args.seq_len, args.max_examples), chunks(tok, eval_text, args.seq_len, 8)
    before = loss(model, held_out)

    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=["down", "up"],
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)  # LoRA on the LowRankLinear factors (plain nn.Linear)
    peft_model.print_trainable_parameters()
    training = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    transformers.Trainer(model=peft_model, args=training, train_dataset=train).train()
    peft_model.eval()
    after = loss(peft_model, held_out)
    peft_model.save_pretrained(out / "adapter")

    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base")  # plain transformers + the plugin
    reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = held_out[0]["input_ids"][None]
    with torch.inference_mode():
        expected = peft_model(input_ids=ids).logits
        adapter_ok = torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
        merged = peft_model.merge_and_unload()  # LoRA folded into the factors: still a compressed model
        merged_logits = merged(input_ids=ids).logits  # equal to the adapter's up to fp32 rounding of the fold
        merged_ok = torch.allclose(merged_logits, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
        merged.save_pretrained(out / "merged")
        merged_again = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        merged_ok &= torch.equal(merged_again(input_ids=ids).logits, merged_logits)  # the reload: exact
    n_merged = sum(p.numel() for p in merged_again.parameters())
    print(f"held-out loss: {before:.4f} before, {after:.4f} after {args.steps} LoRA steps")
    print(f"adapter reload matches: {adapter_ok}; merged model {n_merged:,} parameters (base {n_base:,}), "
          f"reload matches: {merged_ok}")
    return 0 if adapter_ok and merged_ok and n_merged == n_base else 1


if __name__ == "__main__":
    raise SystemExit(main())
