"""AdaPTwin suite: ``python -m benchmarks suite adaptwin [--settings 20 30 45] [--compare] [--smollm] …``.

Whisper (tiny.en by default): product-twin compression of the encoder self-attention (``ProductTwinConfig``,
whitened) plus whitened SVD of the encoder FFN (fc1/fc2) for the rest of the encoder parameter reduction, then one
PEFT LoRA adapter per espeak-ng voice (``hf_compress.adapters``, ``Seq2SeqTrainer``). WER per voice for: dense,
compressed, compressed + that voice's LoRA, compressed + another voice's LoRA (the next voice in the list); LoRA
wall seconds per voice (encoder caching included).

Settings ``<pct>`` (encoder parameter reduction; a LoRA row's size also counts one speaker adapter, so its
``encoder_reduction`` is lower: 30 -> 24.7 % on tiny.en): twin ranks QK 16 / VO 48 of 64 per head on every encoder
self-attention (attention is only 28.8 % of tiny.en's encoder; in a measured sweep the VO product was the more
sensitive one and FFN SVD cheaper than going below these ranks), fc1/fc2 SVD rank chosen to reach ``pct`` %.
LoRA (``--objective distill``, the default): encoder-side adapters (self-attention q/k/v/out and the fc1/fc2
factors, ``adapters.encoder_targets``) trained to match the dense encoder's output on that voice's training audio
(``train_speaker_adapter(teacher=dense)``; no transcripts), on 30 s windows packing several of its utterances
(``--pack`` shuffled passes, a quarter of the windows one utterance alone; ``--pack 0``: one utterance a window).
``--objective transcripts``: decoder-side adapters (self-, cross-attention q/k/v/out, fc1/fc2) trained on the
transcripts, on encoder outputs cached once per utterance with the frozen compressed encoder
(``cache_encoder=True``). Training stops after ``--train-seconds``.

``--heal-seconds S`` (off by default): before the speaker adapters, heal the compressed encoder with
``hf_compress.healing.heal_encoder`` (the same distillation objective, LoRA merged back, parameter count unchanged)
on ``--heal-voices`` (espeak-ng voices disjoint from the test voices, ``--heal-per-voice`` utterances each, read from
the train sentences). Rows ``product_twin+heal`` (no speaker LoRA), ``product_twin+heal+own-lora`` and
``product_twin+heal+other-lora``. ``--heal-save DIR`` keeps the healed model (``save_pretrained``) and
``--heal-load DIR`` reuses it instead of healing again (one setting); with ``--heal-seconds`` too, the loaded model
is healed one more round (a fresh LoRA and optimizer, merged; ``heal.round`` counts them, ``heal.earlier`` keeps the
loaded rounds' statistics). ``--lora-replay N`` adds N utterances of each
heal voice to every speaker adapter's training set (replay, so the adapter keeps working on other voices); its
rows end in ``+replay``.

``--compare``: product twin vs separate SVD of q/k/v/out at equal parameters (encoder attention −50 %: twin rank
32/32 vs SVD rank 96 of each projection; plain and whitened), compressed WER. ``--smollm``: SmolLM2-135M
perplexity at −20 % attention parameters: VO twin rank 38 (RoPE: no QK twin) vs separate SVD of q_proj and
o_proj at rank 211 (equal parameters), plain and whitened.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig
from hf_compress.adapters import DECODER_TARGETS, encoder_targets, lora_config, train_speaker_adapter
from hf_compress.healing import heal_encoder
from hf_compress.methods.adaptwin import ProductTwinConfig

from .. import asr, data, harness, metrics, speech, zoo

ENC_ATTN = r"model\.encoder\.layers\.\d+\.self_attn$"
ENC_PROJ = r"model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj$"
ENC_FFN = r"model\.encoder\.layers\.\d+\.fc(1|2)$"
MAX_NEW_TOKENS = 48
QK_RANK, VO_RANK = 16, 48
# --heal: espeak-ng voices disjoint from the test voices (other accents, none built on the en-us / en-gb bases, other
# pitch variants than +f3). The first four alone were the heal of adaptwin.json's setting-30 rows; all eight, 50
# utterances each, that of adaptwin.test100.json.
HEAL_VOICES = ("en-gb-scotland", "en-029+f2", "en-gb-x-rp+f4", "en-us-nyc+m3",
               "en-gb-x-gbclan+f1", "en-gb-x-gbcwmd+m2", "en-us-nyc+f5", "en-gb-scotland+f2")
HEAL_STATS = "heal_stats.json"  # beside a --heal-save checkpoint


def encoder_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.model.encoder.parameters())


def plan_for(setting: str, model: torch.nn.Module) -> tuple[CompressionConfig, dict[str, Any]]:
    """Plan of an encoder-reduction setting ``"<pct>"``: whitened twin (QK_RANK, VO_RANK) + whitened FFN SVD."""
    if not setting.isdigit() or not 0 < int(setting) < 90:
        raise ValueError(f"adaptwin suite: setting {setting!r} must be an encoder reduction in percent, e.g. 30.")
    cfg = model.config
    d, ffn, layers, heads = cfg.d_model, cfg.encoder_ffn_dim, cfg.encoder_layers, cfg.encoder_attention_heads
    head_dim = d // heads
    attn_cut = layers * 2 * heads * d * (2 * head_dim - QK_RANK - VO_RANK)
    per_ffn = (int(setting) / 100 * encoder_params(model) - attn_cut) / (2 * layers)  # each fc must lose this
    mods: dict[str, Any] = {ENC_ATTN: ProductTwinConfig(rank=QK_RANK, vo_rank=VO_RANK, whiten=True)}
    info: dict[str, Any] = {"twin_qk_rank": QK_RANK, "twin_vo_rank": VO_RANK, "whiten": True}
    if per_ffn > 0:
        rank = int((d * ffn - per_ffn) // (d + ffn))
        mods[ENC_FFN] = LowRankConfig(rank=rank, method="whitened")
        info["ffn_svd_rank"] = rank
    return CompressionConfig(modules=mods), info


def with_mean(quality: dict[str, Any]) -> dict[str, Any]:
    """Adds ``wer``: the mean of the per-voice ``wer_<voice>`` values (the plotted metric)."""
    values = [v for k, v in quality.items() if k.startswith("wer_")]
    return {**quality, "wer": round(sum(values) / len(values), 4)} if values else quality


def _wer(model: Any, processor: Any, utterances: list[Any]) -> float:
    return round(asr.wer(model, processor, utterances, max_new_tokens=MAX_NEW_TOKENS)["wer"], 4)


def wer_by_voice(model: Any, processor: Any, sets: dict[str, Any]) -> dict[str, float]:
    return with_mean({f"wer_{v}": _wer(model, processor, s["test"]) for v, s in sets.items()})


def calibration_batches(processor: Any, sets: dict[str, Any], per_voice: int) -> list[dict[str, Any]]:
    """``per_voice`` train utterances of every voice as ``{input_features, decoder_input_ids}`` batches (the decoder
    gets only the start token: the plans compress the encoder)."""
    return data.speech_calibration_batches(processor, [u for s in sets.values() for u in s["train"][:per_voice]], 1,
                                           start_only=True)


def _size(model: Any, dense_params: int) -> dict[str, Any]:
    enc = encoder_params(model)
    return {"params": sum(p.numel() for p in model.parameters()), "encoder_params": enc,
            "encoder_reduction": round(1 - enc / dense_params, 4)}


def adapter_size(model: Any, config: Any) -> dict[str, int]:
    """Parameters one speaker adapter (the LoRA ``config``) adds to ``model`` (not changed), total and encoder."""
    from peft import get_peft_model

    lora = [(n, p.numel()) for n, p in get_peft_model(copy.deepcopy(model), config).named_parameters() if "lora_" in n]
    return {"adapter_params": sum(k for _, k in lora),
            "adapter_encoder_params": sum(k for n, k in lora if ".encoder." in n)}


def with_adapter(size: dict[str, Any], adapter: dict[str, int], dense_encoder: int) -> dict[str, Any]:
    """The size of a compressed model serving one speaker: its own plus that speaker's adapter."""
    enc = size["encoder_params"] + adapter["adapter_encoder_params"]
    return {**size, "params": size["params"] + adapter["adapter_params"], "encoder_params": enc,
            "encoder_reduction": round(1 - enc / dense_encoder, 4), **adapter,
            "encoder_reduction_without_adapter": size["encoder_reduction"]}


def _compressed(dense: Any, plan: CompressionConfig, calib: Any, info: dict[str, Any]) -> Any:
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    hf_compress.compress(model, plan, calibration=calib, progress=False)
    info["compress_s"] = round(time.perf_counter() - t0, 2)
    return model


def run_setting(bench: harness.Bench, args: Any, dense: Any, processor: Any, sets: dict[str, Any], calib: Any,
                setting: str, dense_rec: dict[str, Any] | None, budget: dict[str, Any]) -> None:
    """Compressed WER, then one LoRA per voice: own- and other-voice WER; saved after each record."""
    plan, info = plan_for(setting, dense)
    model = _compressed(dense, plan, calib, info)
    size = _size(model, encoder_params(dense))
    if not args.heal_load:  # a loaded healed model: its compressed (unhealed) WER is in the run that saved it
        quality = wer_by_voice(model, processor, sets)
        bench.record(args.model, "product_twin", {"setting": setting, **info, "lora": None, "budget": budget},
                     quality=quality, size=size, dense=dense_rec)
        bench.save(args.out)
        print(f"[adaptwin] {setting}: {size} compressed {quality}", flush=True)
    prefix = "product_twin"
    if args.heal_load:  # a healed model saved by an earlier --heal-save run; its WERs are in that run
        model = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(args.heal_load).eval()
        if encoder_params(model) != size["encoder_params"]:
            raise ValueError(f"adaptwin suite: --heal-load {args.heal_load} holds a model with "
                             f"{encoder_params(model)} encoder parameters, setting {setting} gives "
                             f"{size['encoder_params']}; heal it with this setting's plan.")
        info["heal"] = {**json.loads((Path(args.heal_load) / HEAL_STATS).read_text()), "loaded_from": args.heal_load}
        prefix = "product_twin+heal"
    if args.heal_seconds > 0:  # after --heal-load: one more round (a new LoRA, merged) on top of the loaded heal
        earlier = info.get("heal")
        heal_round = earlier.get("round", 1) + 1 if earlier else 1
        model, heal_stats = heal_encoder(model, processor, args.heal_utts, dense, r=args.lora_r,
                                         max_seconds=args.heal_seconds, learning_rate=args.lr, pack=args.pack,
                                         seed=heal_round - 1)
        info["heal"] = {"voices": args.heal_voices, "per_voice": args.heal_per_voice, "offset": args.heal_offset,
                        **heal_stats, "round": heal_round, **({"earlier": earlier} if earlier else {})}
        if args.heal_save:
            model.save_pretrained(args.heal_save)
            data._write_atomic(Path(args.heal_save) / HEAL_STATS, json.dumps(info["heal"], indent=1).encode())
        prefix = "product_twin+heal"
        quality = wer_by_voice(model, processor, sets)
        bench.record(args.model, prefix, {"setting": setting, **info, "lora": None, "budget": budget},
                     quality=quality, size=_size(model, encoder_params(dense)), dense=dense_rec)
        bench.save(args.out)
        print(f"[adaptwin] {setting}: healed {info['heal']} {quality}", flush=True)
    train_s: dict[str, float] = {}
    stats_by_voice: dict[str, Any] = {}
    peft_model: Any = model
    distill = args.objective == "distill"
    targets = encoder_targets(model) if distill else DECODER_TARGETS
    lora_size = with_adapter(size, adapter_size(model, lora_config(r=args.lora_r, alpha=2 * args.lora_r,
                                                                   target_modules=targets)), encoder_params(dense))
    with tempfile.TemporaryDirectory() as tmp:
        for voice in args.voices:
            peft_model, stats = train_speaker_adapter(
                peft_model, processor, sets[voice]["train"] + args.replay_utts, voice.replace("+", "_"), tmp,
                config=lora_config(r=args.lora_r, alpha=2 * args.lora_r, target_modules=targets),
                max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                max_seconds=args.train_seconds, cache_encoder=not distill, lr_scheduler="constant_with_warmup",
                warmup_steps=3, teacher=dense if distill else None, pack=args.pack if distill else 0,
                speeds=args.speeds if distill and args.pack else (1.0,), warps=args.warps if distill else (1.0,))
            train_s[voice] = stats["seconds"]
            stats_by_voice[voice] = {k: v for k, v in stats.items() if k != "path"}
            print(f"[adaptwin] {setting}: LoRA {voice}: {stats}", flush=True)
        own, other = {}, {}
        for i, voice in enumerate(args.voices):
            donor = args.voices[(i + 1) % len(args.voices)]
            peft_model.set_adapter(voice.replace("+", "_"))
            own[f"wer_{voice}"] = _wer(peft_model, processor, sets[voice]["test"])
            peft_model.set_adapter(donor.replace("+", "_"))
            other[f"wer_{voice}"] = _wer(peft_model, processor, sets[voice]["test"])
            other[f"donor_{voice}"] = donor
    lora = {"budget": budget, "train_seconds": train_s, "train_stats": stats_by_voice, "objective": args.objective}
    tag = "+replay" if args.lora_replay else ""
    for method, q in ((f"{prefix}+own-lora{tag}", own), (f"{prefix}+other-lora{tag}", other)):
        bench.record(args.model, method, {"setting": setting, **info, **lora}, quality=with_mean(q), size=lora_size,
                     dense=dense_rec)
    path = bench.save(args.out)
    print(f"[adaptwin] {setting}: own {own} other {other}; wrote {path}", flush=True)


def run_compare(bench: harness.Bench, args: Any, dense: Any, processor: Any, sets: dict[str, Any], calib: Any,
                dense_rec: dict[str, Any] | None) -> None:
    """Twin (32/32) vs separate SVD (rank 96) of the encoder attention at equal parameters, plain and whitened."""
    for whiten in args.compare_whiten:
        for method, plan in (
                ("compare-product_twin", {ENC_ATTN: ProductTwinConfig(rank=32, whiten=bool(whiten))}),
                ("compare-separate-svd", {ENC_PROJ: LowRankConfig(rank=96, method="whitened" if whiten else "svd")})):
            info: dict[str, Any] = {"setting": "attn-50", "whiten": bool(whiten),
                                    **({"twin_rank": 32} if "twin" in method else {"svd_rank": 96})}
            model = _compressed(dense, CompressionConfig(modules=plan), calib if whiten else None, info)
            size = _size(model, encoder_params(dense))
            size["encoder_attention_params"] = sum(p.numel() for n, p in model.model.encoder.named_parameters()
                                                   if ".self_attn." in n and n.endswith("weight"))
            quality = wer_by_voice(model, processor, sets)
            bench.record(args.model, method, info, quality=quality, size=size, dense=dense_rec)
            bench.save(args.out)
            print(f"[adaptwin] compare {method} whiten={whiten}: {size} {quality}", flush=True)


def run_smollm(bench: harness.Bench, args: Any) -> None:
    """SmolLM2-135M perplexity at −20 % attention parameters: VO twin vs separate SVD (q_proj, o_proj)."""
    model, tok = zoo.load("smollm2-135m")
    model.eval()
    b = harness.BUDGETS["default"]
    text = data.eval_text()

    def ppl(m: Any) -> dict[str, Any]:
        r = metrics.perplexity(m, tok, text, max_tokens=b["ppl_tokens"], window=b["ppl_window"],
                               stride=b["ppl_stride"])
        return {"ppl": r["ppl"], "ppl_tokens": r.get("tokens"), "ppl_window": b["ppl_window"]}

    def attn_params(m: Any) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if ".self_attn." in n)

    dense_attn = attn_params(model)
    size = {"params": sum(p.numel() for p in model.parameters()), "attention_params": dense_attn}
    dense_rec = bench.record("smollm2-135m", "dense", {"setting": "attn-20"}, quality=ppl(model), size=size)
    bench.save(args.out)
    calib = data.calibration_batches(tok, n_samples=8, seq_len=256)
    for whiten in (False, True):
        for method, plan in (
                ("smollm-product_twin-vo", {r"self_attn$": ProductTwinConfig(rank=38, parts="vo", whiten=whiten)}),
                ("smollm-separate-svd", {r"self_attn\.(q|o)_proj$": LowRankConfig(
                    rank=211, method="whitened" if whiten else "svd")})):
            info: dict[str, Any] = {"setting": "attn-20", "whiten": bool(whiten),
                                    **({"vo_rank": 38} if "twin" in method else {"svd_rank": 211})}
            m = _compressed(model, CompressionConfig(modules=plan), calib if whiten else None, info)
            size = {"params": sum(p.numel() for p in m.parameters()), "attention_params": attn_params(m),
                    "attention_reduction": round(1 - attn_params(m) / dense_attn, 4)}
            bench.record("smollm2-135m", method, info, quality=ppl(m), size=size, dense=dense_rec)
            bench.save(args.out)
            print(f"[adaptwin] smollm {method} whiten={whiten}: {size} {bench.records[-1]['quality']}", flush=True)
            del m


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks suite adaptwin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--settings", nargs="*", default=["20", "30", "45"])
    parser.add_argument("--compare", action="store_true", help="twin vs separate SVD at equal parameters")
    parser.add_argument("--compare-whiten", nargs="+", type=int, default=[0, 1], help="--compare: 0 plain, 1 whitened")
    parser.add_argument("--smollm", action="store_true", help="SmolLM2-135M perplexity, twin vs separate SVD")
    parser.add_argument("--voices", nargs="+", default=["en-us", "en-gb", "en-us+f3"])
    parser.add_argument("--n-per-voice", type=int, default=300, help="sentences per voice (1/3 test, rest train)")
    parser.add_argument("--n-train", type=int, default=200, help="train utterances used per voice")
    parser.add_argument("--n-test", type=int, default=30, help="test utterances per voice")
    parser.add_argument("--objective", choices=["distill", "transcripts"], default="distill",
                        help="LoRA objective: match the dense encoder (encoder adapters) or the transcripts (decoder)")
    parser.add_argument("--steps", type=int, default=2000, help="LoRA step cap (--train-seconds usually binds)")
    parser.add_argument("--train-seconds", type=float, default=600.0, help="LoRA training wall time per voice")
    parser.add_argument("--pack", type=int, default=3, help="distill: train on 30 s windows packing several "
                        "utterances, this many shuffled passes (adapters.pack_utterances); 0: one utterance a window")
    parser.add_argument("--speeds", nargs="+", type=float, default=[1.0], help="with --pack: speed-perturbation "
                        "factors drawn per utterance (adapters.change_speed), e.g. 0.9 1.0 1.1 1.2")
    parser.add_argument("--warps", nargs="+", type=float, default=[1.0], help="distill: mel-warp (vocal tract "
                        "length) factors drawn per window (adapters.warp_features), e.g. 0.85 0.9 ... 1.2")
    parser.add_argument("--heal-seconds", type=float, default=0.0, help="before the speaker adapters: heal the "
                        "compressed encoder (hf_compress.healing.heal_encoder, LoRA merged) on --heal-voices for this "
                        "training wall time (the dense teacher's output caching comes on top and is included "
                        "in the reported seconds); 0 = off")
    parser.add_argument("--heal-voices", nargs="+", default=list(HEAL_VOICES), help="--heal: espeak-ng voices, "
                        "disjoint from --voices")
    parser.add_argument("--heal-per-voice", type=int, default=50, help="--heal: utterances per heal voice")
    parser.add_argument("--heal-offset", type=int, default=0, help="--heal: shift each heal voice's slice of "
                        "train sentences by this many (a further round on pairs the earlier rounds did not hear)")
    parser.add_argument("--heal-save", default=None, help="--heal: save the healed model (save_pretrained) here")
    parser.add_argument("--heal-load", default=None, help="use a model saved by --heal-save instead of healing "
                        "(one setting only); with --heal-seconds, heal it one more round (fresh LoRA, merged)")
    parser.add_argument("--lora-replay", type=int, default=0, help="distill: add this many utterances of each "
                        "--heal-voices voice (train sentences) to every speaker adapter's training set, so the adapter "
                        "keeps working on other voices (0 = the speaker's utterances only, the paper's setting)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 while other benchmarks share the CPU)")
    parser.add_argument("--calib-per-voice", type=int, default=2, help="train utterances per voice for whitening")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense WER (another process measures it)")
    parser.add_argument("--description", default="", help="appended to the JSON description (e.g. reductions)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--recount-adapters", nargs="+", default=None, metavar="FILE", help="only add one speaker "
                        "adapter's parameters to the LoRA rows of these results files (recorded before they counted)")
    args = parser.parse_args(argv)
    if args.recount_adapters:
        from ._adaptwin_recount import recount_adapters

        for path in args.recount_adapters:
            recount_adapters(path)
        return 0
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bench = harness.Bench("adaptwin", description=(__doc__.splitlines()[0] + " " + args.description).strip())
    if args.settings or args.compare:
        full = speech.speech_set(tuple(args.voices), args.n_per_voice)
        sets = {v: {"train": s["train"][: args.n_train], "test": s["test"][: args.n_test]} for v, s in full.items()}
        budget = {"n_train": len(next(iter(sets.values()))["train"]), "n_test": args.n_test,
                  "max_steps": args.steps, "train_seconds": args.train_seconds, "batch_size": args.batch_size,
                  "lr": args.lr, "lora_r": args.lora_r, "objective": args.objective,
                  "pack": args.pack if args.objective == "distill" else 0,
                  "speeds": args.speeds if args.objective == "distill" and args.pack else [1.0],
                  "warps": args.warps if args.objective == "distill" else [1.0],
                  "lora_targets": "encoder_targets(model)" if args.objective == "distill" else DECODER_TARGETS,
                  "cache_encoder": args.objective != "distill",
                  "voices": args.voices, "torch_threads": args.threads}
        if args.heal_load and len(args.settings) != 1:
            parser.error("--heal-load holds one healed model: give exactly one --settings value")
        if args.heal_load and args.heal_save and Path(args.heal_load).resolve() == Path(args.heal_save).resolve():
            parser.error("--heal-save must differ from --heal-load (the loaded checkpoint is kept; save the further "
                         "healed model to a new folder)")
        shared = sorted(set(args.heal_voices) & set(args.voices))
        if shared:
            parser.error(f"--heal-voices must be disjoint from --voices (shared: {shared})")
        train_texts = [u.text for u in next(iter(full.values()))["train"]]  # the same sentences for every voice
        args.heal_utts = (speech.voice_utterances(args.heal_voices, train_texts, args.heal_per_voice,
                                                   args.heal_offset)
                          if args.heal_seconds > 0 else [])
        args.replay_utts = (speech.voice_utterances(args.heal_voices, train_texts, args.lora_replay)
                            if args.lora_replay > 0 else [])
        budget["heal_seconds"] = args.heal_seconds
        budget["lora_replay"] = {"per_voice": args.lora_replay, "voices": args.heal_voices} if args.lora_replay else 0
        dense, processor = zoo.load(args.model)
        dense.eval()
        dense_rec = None
        if not args.no_dense:
            dense_rec = bench.record(args.model, "dense", {"budget": budget},
                                     quality=wer_by_voice(dense, processor, sets),
                                     size=_size(dense, encoder_params(dense)))
            bench.save(args.out)
        calib = calibration_batches(processor, sets, args.calib_per_voice)
        budget["calibration_utterances"] = len(calib)
        for setting in args.settings:
            run_setting(bench, args, dense, processor, sets, calib, setting, dense_rec, budget)
        if args.compare:
            run_compare(bench, args, dense, processor, sets, calib, dense_rec)
    if args.smollm:
        run_smollm(bench, args)
    return 0
