"""AdaPTwin: compress a Whisper encoder's attention with product twins, then adapt it per speaker with LoRA.

    python examples/adaptwin_speaker.py --model whisper-tiny.en --voices en-us en-gb --rank 32 --steps 40 --out out
    python examples/adaptwin_speaker.py --model tiny-random --out out      # seconds, random weights (smoke test)
    python examples/adaptwin_speaker.py --model whisper-tiny.en --rank 16 --vo-rank 48 --cache-encoder \
        --train-seconds 180 --n-train 48 --steps 1000 --batch-size 8 --out out   # decoder-side LoRA, CPU-friendly
    python examples/adaptwin_speaker.py --model whisper-tiny.en --rank 16 --vo-rank 48 --distill \
        --pack 3 --train-seconds 600 --n-train 200 --steps 10000 --batch-size 4 --out out  # encoder LoRA: match dense
    ... --distill --heal-voices en-gb-scotland en-029+f2 --heal-seconds 900 ...  # generic heal first, then speakers

``--heal-voices`` (with ``--distill``): before the speaker adapters, heal the compressed encoder on those voices
(``hf_compress.healing.heal_encoder``: the same distillation, LoRA merged into the weights; pick voices other than
``--voices``), so every speaker starts from a better model.
``--model``: a local Whisper folder, a Hub id, a ``benchmarks.zoo`` name (offline materialization) or ``tiny-random``.
Speakers are espeak-ng voices from ``benchmarks.speech`` (``tiny-random`` uses synthetic noise "speakers").
Writes ``out/model`` (the compressed model) and ``out/adapters/<speaker>`` (standard PEFT adapter folders), then
reloads both and switches adapters per speaker with ``set_adapter``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from _common import _benchmarks

import hf_compress
from hf_compress import CompressionConfig, ProductTwinConfig
from hf_compress.adapters import (
    DECODER_TARGETS,
    encoder_targets,
    load_speaker_adapter,
    lora_config,
    set_speaker,
    train_speaker_adapter,
)
from hf_compress.healing import heal_encoder

ENC_ATTN = r"encoder\.layers\.\d+\.self_attn$"


class TinyProcessor:
    """Stand-in ``WhisperProcessor`` for ``tiny-random``: 16-bin, 32-frame features and a byte tokenizer."""

    def __init__(self) -> None:
        self.feature_extractor = transformers.WhisperFeatureExtractor(feature_size=16, hop_length=16, chunk_length=1,
                                                                      n_fft=64)
        self.feature_extractor.n_samples, self.feature_extractor.nb_max_frames = 512, 32
        self.tokenizer = self

    def __call__(self, text: str) -> Any:
        return transformers.BatchEncoding({"input_ids": [1] + [3 + (ord(c) % 90) for c in text[:12]] + [2]})

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(chr(int(i) - 3 + 32) for i in row if int(i) > 2) for row in ids]


def load(name: str) -> tuple[Any, Any]:
    """(model, processor) for a folder, a Hub id, a zoo name or ``tiny-random``."""
    if name == "tiny-random":
        torch.manual_seed(0)
        cfg = transformers.WhisperConfig(
            vocab_size=96, d_model=48, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
            max_source_positions=16, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
            eos_token_id=2, bos_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
        return transformers.WhisperForConditionalGeneration(cfg).eval(), TinyProcessor()
    if Path(name).is_dir() or "/" in name:  # a folder or a Hub id
        return (transformers.AutoModelForSpeechSeq2Seq.from_pretrained(name),
                transformers.WhisperProcessor.from_pretrained(name))
    _benchmarks()  # the repository's benchmarks package, beside examples/
    from benchmarks import zoo

    return zoo.load(name)


def speakers(model_name: str, voices: list[str], n_train: int, n_test: int) -> dict[str, dict[str, list[Any]]]:
    """``{speaker: {"train": [...], "test": [...]}}``: espeak-ng utterances, or noise pairs for tiny-random."""
    if model_name == "tiny-random":
        rng = np.random.default_rng(0)

        def make(i: int, s: int) -> tuple[np.ndarray, str]:
            return rng.normal(0, 0.1 * (s + 1), 400).astype(np.float32), f"word {i}"

        return {f"spk{s}": {"train": [make(i, s) for i in range(n_train)], "test": [make(i, s) for i in range(n_test)]}
                for s in range(2)}
    _benchmarks()  # the repository's benchmarks package, beside examples/
    from benchmarks import speech

    sets = speech.speech_set(tuple(voices), n_train + n_test + 3 * n_test)
    return {v.replace("+", "_"): {"train": s["train"][:n_train], "test": s["test"][:n_test]} for v, s in sets.items()}


def heal_set(model_name: str, voices: list[str], train: list[Any], n: int) -> list[Any]:
    """``n`` utterances per heal voice of the speakers' ``train`` sentences (no test sentence), or noise clips for
    tiny-random."""
    if model_name == "tiny-random":
        rng = np.random.default_rng(1)
        return [(rng.normal(0, 0.05 * (i % 4 + 1), 400).astype(np.float32), "") for i in range(n * len(voices))]
    _benchmarks()  # the repository's benchmarks package, beside examples/
    from benchmarks import speech

    return speech.voice_utterances(voices, [u.text for u in train], n)


@torch.inference_mode()
def transcribe(model: Any, processor: Any, items: list[Any]) -> list[str]:
    from hf_compress.adapters import audio_and_text

    audios, _ = audio_and_text(items)
    feats = processor.feature_extractor(audios, sampling_rate=16000, return_tensors="pt").input_features
    return processor.tokenizer.batch_decode(model.generate(input_features=feats, max_new_tokens=24),
                                            skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--voices", nargs="+", default=["en-us", "en-gb"])
    parser.add_argument("--rank", type=int, default=None, help="per-head twin rank (default: half the head dim)")
    parser.add_argument("--vo-rank", type=int, default=None, help="per-head VO rank (default: same as QK)")
    parser.add_argument("--cache-encoder", action="store_true",
                        help="decoder-side LoRA on cached (frozen) encoder outputs: ~10x cheaper steps on a CPU")
    parser.add_argument("--distill", action="store_true",
                        help="encoder-side LoRA trained to match the dense (uncompressed) encoder; no transcripts")
    parser.add_argument("--pack", type=int, default=0, help="with --distill: train on 30 s windows packing several "
                        "utterances, this many shuffled passes (0: one utterance a window)")
    parser.add_argument("--warps", nargs="+", type=float, default=[1.0], help="with --distill: mel-warp (vocal "
                        "tract length) factors drawn per window, e.g. 0.9 1.0 1.1 (other voices of the same speaker)")
    parser.add_argument("--heal-voices", nargs="*", default=[], help="with --distill: heal the compressed encoder "
                        "on these voices first (hf_compress.healing.heal_encoder), e.g. en-gb-scotland en-029+f2")
    parser.add_argument("--heal-seconds", type=float, default=None, help="heal training wall-time cap")
    parser.add_argument("--train-seconds", type=float, default=None, help="stop each adapter's training after this")
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-test", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.distill and args.cache_encoder:
        parser.error("--cache-encoder trains decoder adapters on cached encoder outputs; --distill trains encoder "
                     "adapters against the dense encoder: give one")
    needs_distill = [flag for flag, on in (("--heal-voices", args.heal_voices), ("--pack", args.pack),
                                           ("--warps", args.warps != [1.0])) if on]
    if needs_distill and not args.distill:
        parser.error(f"{', '.join(needs_distill)} need(s) --distill (they shape the encoder distillation's inputs)")
    out = Path(args.out)

    model, processor = load(args.model)
    teacher = load(args.model)[0].eval() if args.distill else None
    twin = (ProductTwinConfig(rank=args.rank, vo_rank=args.vo_rank) if args.rank
            else ProductTwinConfig(rank_ratio=0.5, vo_rank=args.vo_rank))
    hf_compress.compress(model, CompressionConfig(modules={ENC_ATTN: twin}), progress=False)
    data = speakers(args.model, args.voices, args.n_train, args.n_test)
    if args.heal_voices:
        heal = heal_set(args.model, args.heal_voices, next(iter(data.values()))["train"], args.n_train)
        model, stats = heal_encoder(model, processor, heal, teacher, r=4, max_seconds=args.heal_seconds,
                                    max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                                    pack=args.pack)
        print(f"healed on {args.heal_voices}: {stats['seconds']} s, {stats['steps']} steps")
    model.save_pretrained(out / "model")

    peft_model: Any = model
    targets: Any = DECODER_TARGETS if args.cache_encoder else ("q_proj", "v_proj")
    if args.distill:
        targets = encoder_targets(model)
    for spk, split in data.items():
        peft_model, stats = train_speaker_adapter(peft_model, processor, split["train"], spk, out / "adapters",
                                                  config=lora_config(r=4, alpha=8, target_modules=targets),
                                                  max_steps=args.steps, batch_size=args.batch_size,
                                                  learning_rate=args.lr, max_seconds=args.train_seconds,
                                                  cache_encoder=args.cache_encoder, teacher=teacher,
                                                  pack=args.pack if args.distill else 0,
                                                  warps=args.warps if args.distill else (1.0,))
        print(f"trained adapter {spk}: {stats['seconds']} s, loss {stats['train_loss']:.3f} -> {stats['path']}")

    base = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(out / "model")  # plain transformers reload
    reloaded: Any = base
    for spk in data:
        reloaded = load_speaker_adapter(reloaded, out / "adapters" / spk, spk)
    for spk, split in data.items():
        set_speaker(reloaded, spk)
        print(f"[{spk}] {transcribe(reloaded, processor, split['test'])}")
    print(f"adapters: {sorted(reloaded.peft_config)}; model: {type(base).__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
