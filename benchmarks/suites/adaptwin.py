"""AdaPTwin suite: ``python -m benchmarks suite adaptwin [--settings 20 30] [--steps N] [--n-train N] …``.

Whisper tiny.en, product-twin compression of the encoder self-attention (``ProductTwinConfig``), then one PEFT
LoRA adapter per espeak-ng voice (``hf_compress.adapters``, ``Seq2SeqTrainer``). WER per voice for: dense,
compressed, compressed + that voice's LoRA, compressed + another voice's LoRA (the next voice in the list);
LoRA training seconds per voice. Settings (encoder parameter reduction; attention is only 28.8 % of the encoder,
so the twin alone cannot reach 30 %):

- ``20``: twin rank 20/64 per head on every encoder self-attention, whitened (≈ −19.8 % encoder parameters);
  ``20-plain``: the same without whitening; ``20-separate-svd``: separate whitened SVDs of q/k/v/out at equal
  parameters (rank 60 each). These two: compressed WER only (no LoRA).
- ``twin-r<rank>``: twin at that rank, whitened, compressed WER only (a rank sweep point).
- ``30``: twin rank 16/64 plus whitened SVD of the encoder fc1/fc2 at the rank that brings the encoder to ≈ −30 %.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

import torch

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig
from hf_compress.adapters import lora_config, train_speaker_adapter
from hf_compress.methods.adaptwin import ProductTwinConfig

from .. import asr, harness, speech, zoo

ENC_ATTN = r"model\.encoder\.layers\.\d+\.self_attn$"
ENC_FFN = r"model\.encoder\.layers\.\d+\.fc(1|2)$"
MAX_NEW_TOKENS = 48


def encoder_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.model.encoder.parameters())


def plan_for(setting: str, model: torch.nn.Module) -> tuple[CompressionConfig, dict[str, Any]]:
    """The compression plan of a setting and its description (whitened with calibration unless ``-plain``)."""
    if setting == "20":
        return CompressionConfig(modules={ENC_ATTN: ProductTwinConfig(rank=20, whiten=True)}), {"twin_rank": 20}
    if setting == "20-plain":
        return CompressionConfig(modules={ENC_ATTN: ProductTwinConfig(rank=20)}), {"twin_rank": 20, "whiten": False}
    if setting == "30":
        total, d_model, ffn = encoder_params(model), model.config.d_model, model.config.encoder_ffn_dim
        layers, twin_rank = model.config.encoder_layers, 16
        attn_cut = layers * 4 * d_model * d_model * (1 - twin_rank / 64)
        per_ffn = (0.30 * total - attn_cut) / (2 * layers)  # parameters each fc must lose
        rank = int((d_model * ffn - per_ffn) // (d_model + ffn))
        plan = CompressionConfig(modules={ENC_ATTN: ProductTwinConfig(rank=twin_rank, whiten=True),
                                          ENC_FFN: LowRankConfig(rank=rank, method="whitened")})
        return plan, {"twin_rank": twin_rank, "ffn_svd_rank": rank}
    if setting == "20-separate-svd":
        plan = CompressionConfig(modules={ENC_ATTN[:-1] + r"\.(q|k|v|out)_proj$": LowRankConfig(rank=60,
                                                                                             method="whitened")})
        return plan, {"svd_rank": 60, "whiten": True}
    if setting.startswith("twin-r") and setting[6:].isdigit():  # compressed-only rank sweep point
        rank = int(setting[6:])
        return CompressionConfig(modules={ENC_ATTN: ProductTwinConfig(rank=rank, whiten=True)}), {"twin_rank": rank}
    raise ValueError(f"adaptwin suite: unknown setting {setting!r}; use 20, 20-plain, 30, 20-separate-svd or "
                     "twin-r<rank> (e.g. twin-r48, compressed WER only).")


def wer_by_voice(model: Any, processor: Any, sets: dict[str, Any]) -> dict[str, float]:
    return with_mean({f"wer_{v}": _wer(model, processor, s["test"]) for v, s in sets.items()})


def with_mean(quality: dict[str, Any]) -> dict[str, Any]:
    """Adds ``wer``: the mean of the per-voice ``wer_<voice>`` values (the plotted metric)."""
    values = [v for k, v in quality.items() if k.startswith("wer_")]
    return {**quality, "wer": round(sum(values) / len(values), 4)} if values else quality


def _wer(model: Any, processor: Any, utterances: list[Any]) -> float:
    return round(asr.wer(model, processor, utterances, max_new_tokens=MAX_NEW_TOKENS)["wer"], 4)


def calibration_batches(model: Any, processor: Any, sets: dict[str, Any], per_voice: int) -> list[dict[str, Any]]:
    """``per_voice`` train utterances of every voice as ``{input_features, decoder_input_ids}`` batches."""
    start = torch.tensor([[model.config.decoder_start_token_id]])
    return [{"input_features": processor.feature_extractor(speech.load_audio(u.path), sampling_rate=16000,
                                                           return_tensors="pt").input_features,
             "decoder_input_ids": start} for s in sets.values() for u in s["train"][:per_voice]]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks suite adaptwin", description=__doc__)
    parser.add_argument("--settings", nargs="+", default=["20", "30"])
    parser.add_argument("--voices", nargs="+", default=["en-us", "en-gb", "en-us+f3"])
    parser.add_argument("--n-per-voice", type=int, default=60, help="sentences per voice (1/3 test, rest train)")
    parser.add_argument("--n-train", type=int, default=40, help="train utterances used per voice")
    parser.add_argument("--n-test", type=int, default=20, help="test utterances per voice")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--calib-per-voice", type=int, default=3, help="train utterances per voice for whitening")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    full = speech.speech_set(tuple(args.voices), args.n_per_voice)
    sets = {v: {"train": s["train"][: args.n_train], "test": s["test"][: args.n_test]} for v, s in full.items()}
    bench = harness.Bench("adaptwin", description=__doc__.splitlines()[0])
    budget = {"n_train": args.n_train, "n_test": args.n_test, "steps": args.steps, "batch_size": args.batch_size,
              "lr": args.lr, "lora_r": args.lora_r, "lora_targets": ["q_proj", "v_proj"], "voices": args.voices,
              "torch_threads": 2}
    dense, processor = zoo.load("whisper-tiny.en")
    dense.eval()
    dense_params = encoder_params(dense)
    dense_rec = bench.record("whisper-tiny.en", "dense", {"budget": budget},
                             quality=wer_by_voice(dense, processor, sets),
                             size={"params": sum(p.numel() for p in dense.parameters()),
                                   "encoder_params": dense_params})
    bench.save(args.out)
    calib = calibration_batches(dense, processor, sets, args.calib_per_voice)
    budget["calibration_utterances"] = len(calib)
    for setting in args.settings:
        model = copy.deepcopy(dense)
        plan, info = plan_for(setting, model)
        t0 = time.perf_counter()
        hf_compress.compress(model, plan, calibration=calib, progress=False)
        info["compress_s"] = round(time.perf_counter() - t0, 2)
        enc = encoder_params(model)
        size = {"params": sum(p.numel() for p in model.parameters()), "encoder_params": enc,
                "encoder_reduction": round(1 - enc / dense_params, 4)}
        method = {"20-separate-svd": "separate-svd", "20-plain": "product_twin-plain"}.get(setting, "product_twin")
        if setting.startswith("twin-r"):
            method = "product_twin-no-lora"
        quality = wer_by_voice(model, processor, sets)
        bench.record("whisper-tiny.en", method, {"setting": setting, **info, "lora": None, "budget": budget},
                     quality=quality, size=size, dense=dense_rec)
        bench.save(args.out)
        if method != "product_twin":
            continue
        train_s: dict[str, float] = {}
        peft_model: Any = model
        with tempfile.TemporaryDirectory() as tmp:
            for voice in args.voices:
                peft_model, stats = train_speaker_adapter(
                    peft_model, processor, sets[voice]["train"], voice.replace("+", "_"), tmp,
                    config=lora_config(r=args.lora_r, alpha=2 * args.lora_r), max_steps=args.steps,
                    batch_size=args.batch_size, learning_rate=args.lr)
                train_s[voice] = stats["seconds"]
                print(f"[adaptwin] {setting}: LoRA {voice}: {stats}", flush=True)
            own, other = {}, {}
            for i, voice in enumerate(args.voices):
                donor = args.voices[(i + 1) % len(args.voices)]
                peft_model.set_adapter(voice.replace("+", "_"))
                own[f"wer_{voice}"] = _wer(peft_model, processor, sets[voice]["test"])
                peft_model.set_adapter(donor.replace("+", "_"))
                other[f"wer_{voice}"] = _wer(peft_model, processor, sets[voice]["test"])
                other[f"donor_{voice}"] = donor
        lora = {"budget": budget, "train_seconds": train_s}
        bench.record("whisper-tiny.en", "product_twin+own-lora", {"setting": setting, **info, **lora},
                     quality=with_mean(own), size=size, dense=dense_rec)
        bench.record("whisper-tiny.en", "product_twin+other-lora", {"setting": setting, **info, **lora},
                     quality=with_mean(other), size=size, dense=dense_rec)
        path = bench.save(args.out)
        print(f"[adaptwin] {setting}: compressed {quality} own {own} other {other}; wrote {path}", flush=True)
    return 0
