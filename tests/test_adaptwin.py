"""AdaPTwin product twins (``ProductTwinConfig`` / ``TwinAttention``) and per-speaker LoRA adapters, tiny models."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import ARCHS, tiny_model

import hf_compress
import hf_compress.adapters as adapters_module
from hf_compress import CompressionConfig
from hf_compress.adapters import (
    DECODER_TARGETS,
    change_speed,
    encoder_targets,
    load_speaker_adapter,
    lora_config,
    mel_warp_matrix,
    pack_utterances,
    set_speaker,
    train_speaker_adapter,
    warp_features,
)
from hf_compress.layers.twin_attention import TwinAttention
from hf_compress.methods.adaptwin import ProductTwinConfig

WHISPER = next(a for a in ARCHS if a.name == "whisper")
LLAMA = next(a for a in ARCHS if a.name == "llama")
ALL_ATTN = r"(self_attn|encoder_attn)$"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "adaptwin_speaker.py"


def _with_biases(model: torch.nn.Module, q_bias: bool = True) -> torch.nn.Module:
    """Random non-zero biases everywhere (zero query biases with ``q_bias=False``)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 if q_bias or "q_proj" not in name else 0 * p)
    return model


def _llama_biased() -> transformers.PreTrainedModel:
    cfg = LLAMA.make_config()
    cfg.attention_bias = True
    torch.manual_seed(0)
    return _with_biases(transformers.LlamaForCausalLM(cfg).eval())


def _compress(model: torch.nn.Module, cfg: ProductTwinConfig, pattern: str = ALL_ATTN) -> torch.nn.Module:
    return hf_compress.compress(model, CompressionConfig(modules={pattern: cfg}), progress=False)


def _logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("make", [lambda: _with_biases(tiny_model(WHISPER)), _llama_biased], ids=["whisper", "llama"])
def test_full_rank_is_exact(make) -> None:
    """rank_ratio=1.0: encoder self-, decoder self- and cross-attention (Whisper), GQA + biases (Llama)."""
    model = make()
    arch = WHISPER if "Whisper" in type(model).__name__ else LLAMA
    dense = copy.deepcopy(model)
    _compress(model, ProductTwinConfig(rank_ratio=1.0))
    twins = [n for n, m in model.named_modules() if isinstance(m, TwinAttention)]
    assert len(twins) == (6 if arch is WHISPER else 2)
    inputs = arch.inputs()
    torch.testing.assert_close(_logits(model, inputs), _logits(dense, inputs), atol=1e-5, rtol=0)
    gen_in = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}  # cached decoding (cross-attn reuse)
    want = dense.generate(**gen_in, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**gen_in, max_new_tokens=8, do_sample=False), want)


def _head_products(layer: torch.nn.Module, heads: int, kv_heads: int, out_name: str) -> tuple[list, list]:
    """Per query head ``M_QK = Q_hᵀ K_g`` and ``M_VO = V_gᵀ O_hᵀ`` (float64) of a dense or twin attention."""
    q, k, v = (getattr(layer, p).weight.double() for p in ("q_proj", "k_proj", "v_proj"))
    o = getattr(layer, out_name).weight.double()
    rq, rv, groups = q.shape[0] // heads, v.shape[0] // kv_heads, heads // kv_heads
    qk = [q[h * rq:(h + 1) * rq].T @ k[(h // groups) * rq:(h // groups + 1) * rq] for h in range(heads)]
    vo = [v[(h // groups) * rv:(h // groups + 1) * rv].T @ o[:, h * rv:(h + 1) * rv].T for h in range(heads)]
    return qk, vo


def _best(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vt = torch.linalg.svd(m)
    return u[:, :r] * s[:r] @ vt[:r]


def test_truncated_twin_is_eckart_young_optimal_whisper() -> None:
    model = _with_biases(tiny_model(WHISPER), q_bias=False)
    dense = copy.deepcopy(model)
    _compress(model, ProductTwinConfig(rank=5))
    for name in ("model.encoder.layers.0.self_attn", "model.decoder.layers.1.self_attn",
                 "model.decoder.layers.0.encoder_attn"):
        twin, ref = model.get_submodule(name), dense.get_submodule(name)
        assert twin.q_proj.out_features == 4 * 5 and twin.out_proj.in_features == 4 * 5
        qk, vo = _head_products(twin, 4, 4, "out_proj")
        qk0, vo0 = _head_products(ref, 4, 4, "out_proj")
        for got, want in zip(qk + vo, qk0 + vo0):
            torch.testing.assert_close(got, _best(want, 5), atol=1e-5, rtol=1e-5)


def test_query_bias_term_kept_exactly() -> None:
    """``b_q·K_h·y`` (depends on the key) survives truncation exactly: ``K'_hᵀ b'_q = K_hᵀ b_q``."""
    model = _with_biases(tiny_model(WHISPER))
    dense = copy.deepcopy(model)
    _compress(model, ProductTwinConfig(rank=3), pattern=r"encoder\.layers\.0\.self_attn$")
    twin, ref = model.model.encoder.layers[0].self_attn, dense.model.encoder.layers[0].self_attn
    for h in range(4):
        got = twin.k_proj.weight[h * 3:(h + 1) * 3].double().T @ twin.q_proj.bias[h * 3:(h + 1) * 3].double()
        want = ref.k_proj.weight[h * 12:(h + 1) * 12].double().T @ ref.q_proj.bias[h * 12:(h + 1) * 12].double()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the value bias is folded into the output bias: b_o' = b_o + O b_v
    want = ref.out_proj.bias.double() + ref.out_proj.weight.double() @ ref.v_proj.bias.double()
    torch.testing.assert_close(twin.out_proj.bias.double(), want, atol=1e-5, rtol=1e-5)
    assert twin.v_proj.bias is None and twin.k_proj.bias is None


def test_llama_gqa_vo_twin_is_optimal_per_group() -> None:
    model = _llama_biased()
    dense = copy.deepcopy(model)
    _compress(model, ProductTwinConfig(rank=6), pattern=r"self_attn$")
    twin, ref = model.model.layers[0].self_attn, dense.model.layers[0].self_attn
    assert twin.rope and twin.qk_rank == 16 and twin.vo_rank == 6  # RoPE: QK stays dense
    torch.testing.assert_close(twin.q_proj.weight, ref.q_proj.weight)
    _, vo = _head_products(twin, 4, 2, "o_proj")
    _, vo0 = _head_products(ref, 4, 2, "o_proj")
    for g in range(2):  # heads 2g, 2g+1 share KV head g: jointly optimal for [N_h1 | N_h2]
        got = torch.cat([vo[2 * g], vo[2 * g + 1]], dim=1)
        torch.testing.assert_close(got, _best(torch.cat([vo0[2 * g], vo0[2 * g + 1]], dim=1), 6), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("arch", [WHISPER, LLAMA], ids=lambda a: a.name)
def test_generate_save_reload_bit_identical(arch, tmp_path: Path) -> None:
    model = _compress(tiny_model(arch), ProductTwinConfig(rank_ratio=0.5), pattern=ALL_ATTN)
    inputs = arch.inputs()
    gen_in = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    out = model.generate(**gen_in, max_new_tokens=6, do_sample=False)
    model.save_pretrained(tmp_path)
    again = arch.auto_class.from_pretrained(tmp_path).eval()
    assert isinstance(again.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, TwinAttention))),
                      TwinAttention)
    assert torch.equal(_logits(model, inputs), _logits(again, inputs))
    assert torch.equal(again.generate(**gen_in, max_new_tokens=6, do_sample=False), out)


def test_whiten_uses_calibration_and_stays_exact_at_full_rank() -> None:
    calib = [{k: v[:1] for k, v in WHISPER.inputs(seed=s).items()} for s in range(3)]
    base = _with_biases(tiny_model(WHISPER))
    full = hf_compress.compress(copy.deepcopy(base), CompressionConfig(modules={ALL_ATTN: ProductTwinConfig(
        rank_ratio=1.0, whiten=True)}), calibration=calib, progress=False)
    inputs = WHISPER.inputs()
    torch.testing.assert_close(_logits(full, inputs), _logits(base, inputs), atol=1e-5, rtol=0)
    plain = _compress(copy.deepcopy(base), ProductTwinConfig(rank=4))
    white = hf_compress.compress(copy.deepcopy(base), CompressionConfig(modules={ALL_ATTN: ProductTwinConfig(
        rank=4, whiten=True)}), calibration=calib, progress=False)
    assert not torch.allclose(_logits(plain, inputs), _logits(white, inputs))
    with pytest.raises(ValueError, match="calibration"):
        _compress(copy.deepcopy(base), ProductTwinConfig(rank=4, whiten=True))


def test_lora_on_twin_projections_trains_saves_and_switches(tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLE.parent))
    from adaptwin_speaker import TinyProcessor

    model = _compress(tiny_model(WHISPER), ProductTwinConfig(rank=6), pattern=r"encoder\.layers\.\d+\.self_attn$")
    proc = TinyProcessor()
    g = torch.Generator().manual_seed(0)
    data = {s: [(torch.randn(400, generator=g).numpy() * (s + 1), f"say {i}") for i in range(4)] for s in range(2)}
    cfg = lora_config(r=2, alpha=4, target_modules=("q_proj", "k_proj", "v_proj", "out_proj"))
    peft_model = model
    for s in range(2):
        peft_model, stats = train_speaker_adapter(peft_model, proc, data[s], f"spk{s}", tmp_path, config=cfg,
                                                  max_steps=2, batch_size=2, learning_rate=5e-2)
        assert (Path(stats["path"]) / "adapter_model.safetensors").is_file()
    lora_layers = [n for n, _ in peft_model.named_modules() if n.endswith("self_attn.q_proj.lora_A.spk0")]
    assert any(".encoder." in n for n in lora_layers)
    inputs = WHISPER.inputs()
    outs = {}
    for s in range(2):
        set_speaker(peft_model, f"spk{s}")
        outs[s] = _logits(peft_model, inputs)
    assert not torch.allclose(outs[0], outs[1])
    fresh = _compress(tiny_model(WHISPER), ProductTwinConfig(rank=6), pattern=r"encoder\.layers\.\d+\.self_attn$")
    for s in range(2):
        fresh = load_speaker_adapter(fresh, tmp_path / f"spk{s}", f"spk{s}")
    for s in range(2):
        set_speaker(fresh, f"spk{s}")
        torch.testing.assert_close(_logits(fresh, inputs), outs[s], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no adapter 'spk9'"):
        set_speaker(fresh, "spk9")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_speaker_adapter(fresh, tmp_path / "nope", "x")


def test_separate_vo_rank_is_optimal_for_each_product() -> None:
    model = _with_biases(tiny_model(WHISPER), q_bias=False)
    dense = copy.deepcopy(model)
    _compress(model, ProductTwinConfig(rank=3, vo_rank=7), pattern=r"encoder\.layers\.0\.self_attn$")
    twin, ref = model.model.encoder.layers[0].self_attn, dense.model.encoder.layers[0].self_attn
    assert (twin.qk_rank, twin.vo_rank) == (3, 7) and twin.v_proj.out_features == 4 * 7
    qk, vo = _head_products(twin, 4, 4, "out_proj")
    qk0, vo0 = _head_products(ref, 4, 4, "out_proj")
    for got, want, r in [(g, w, 3) for g, w in zip(qk, qk0)] + [(g, w, 7) for g, w in zip(vo, vo0)]:
        torch.testing.assert_close(got, _best(want, r), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="vo_rank"):
        ProductTwinConfig(rank=2, vo_rank=0)


def test_cached_encoder_lora_trains_decoder_only_within_time_limit(tmp_path: Path) -> None:
    """cache_encoder=True: decoder-side adapter only, trained on frozen encoder outputs; max_seconds stops it."""
    sys.path.insert(0, str(EXAMPLE.parent))
    from adaptwin_speaker import TinyProcessor

    model = _compress(tiny_model(WHISPER), ProductTwinConfig(rank=6), pattern=r"encoder\.layers\.\d+\.self_attn$")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(400, generator=g).numpy(), f"say {i}") for i in range(4)]
    inputs = WHISPER.inputs()
    before = _logits(model, inputs)
    cfg = lora_config(r=2, alpha=4, target_modules=DECODER_TARGETS)
    peft_model, stats = train_speaker_adapter(
        model, TinyProcessor(), data, "spk0", tmp_path, config=cfg, max_steps=10_000, batch_size=2,
        learning_rate=5e-2, max_seconds=1.0, cache_encoder=True, warmup_steps=0)
    assert 1 <= stats["steps"] < 10_000 and stats["encoder_cache_seconds"] <= stats["seconds"]
    names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A.spk0")]
    assert names and all(".decoder." in n for n in names)
    assert any("encoder_attn.k_proj" in n for n in names)
    assert not torch.allclose(_logits(peft_model, inputs), before)  # the adapter was trained
    with pytest.raises(ValueError, match="DECODER_TARGETS"):
        train_speaker_adapter(peft_model, TinyProcessor(), data, "spk1", tmp_path, config=lora_config(r=2, alpha=4),
                              max_steps=1, cache_encoder=True)


def test_teacher_distillation_trains_encoder_adapter_toward_the_dense_encoder(tmp_path: Path) -> None:
    """teacher=: encoder-side LoRA (incl. the factors of a low-rank fc1) trained to match the dense encoder."""
    sys.path.insert(0, str(EXAMPLE.parent))
    from adaptwin_speaker import TinyProcessor

    from hf_compress import LowRankConfig

    teacher = tiny_model(WHISPER)
    plan = CompressionConfig(modules={r"encoder\.layers\.\d+\.self_attn$": ProductTwinConfig(rank=3),
                                      r"encoder\.layers\.\d+\.fc1$": LowRankConfig(rank=4)})
    student = hf_compress.compress(copy.deepcopy(teacher), plan, progress=False)
    proc = TinyProcessor()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(400, generator=g).numpy(), f"say {i}") for i in range(4)]
    feats = proc.feature_extractor([a for a, _ in data], sampling_rate=16000, return_tensors="pt").input_features

    def gap(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((model.get_encoder()(feats).last_hidden_state
                          - teacher.get_encoder()(feats).last_hidden_state).pow(2).mean())

    before = gap(student)
    peft_model, stats = train_speaker_adapter(
        student, proc, data, "spk0", tmp_path,
        config=lora_config(r=2, alpha=4, target_modules=encoder_targets(student)), max_steps=30, batch_size=4,
        learning_rate=2e-2, warmup_steps=0, teacher=teacher)
    names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A.spk0")]
    assert names and all(".encoder." in n for n in names) and any("fc1." in n for n in names)
    assert stats["objective"] == "distill" and (Path(stats["path"]) / "adapter_model.safetensors").is_file()
    assert gap(peft_model) < 0.5 * before
    with pytest.raises(ValueError, match="use one of them"):
        train_speaker_adapter(peft_model, proc, data, "spk1", tmp_path, max_steps=1, teacher=teacher,
                              cache_encoder=True)
    assert "model.encoder.layers.0.fc1.down" in encoder_targets(student)
    assert "model.encoder.layers.0.fc1" not in encoder_targets(peft_model)  # a LowRankLinear: PEFT refuses it
    assert encoder_targets(peft_model) == encoder_targets(student)  # LoRA wrappers are seen through
    with pytest.raises(ValueError, match="encoder_targets"):
        train_speaker_adapter(peft_model, proc, data, "spk2", tmp_path, max_steps=1, teacher=teacher,
                              config=lora_config(r=2, alpha=4, target_modules=DECODER_TARGETS))
    for speaker, kwargs, side in (("spk3", {"teacher": teacher}, ".encoder."), ("spk4", {"cache_encoder": True},
                                                                                 ".decoder.")):
        train_speaker_adapter(peft_model, proc, data, speaker, tmp_path, max_steps=1, **kwargs)  # default config
        names = [n for n, _ in peft_model.named_modules() if n.endswith(f"lora_A.{speaker}")]
        assert names and all(side in n for n in names), (speaker, names)


def test_pack_utterances_fills_windows_and_keeps_every_sample() -> None:
    rng = np.random.default_rng(0)
    audios = [rng.standard_normal(int(16000 * s)).astype(np.float32) for s in (1.0, 2.5, 4.0, 7.0, 12.0, 0.5)]
    clipped = sum(min(len(a), 160000) for a in audios)
    windows = pack_utterances(audios, repeats=2, single_fraction=0.0, window_seconds=10.0, gap_seconds=0.5)
    assert all(len(w) <= 160000 for w in windows) and len(windows) < 2 * len(audios)
    assert sum(map(len, windows)) == 2 * clipped + (2 * len(audios) - len(windows)) * 8000  # speech + gaps only
    alone = pack_utterances(audios, repeats=2, single_fraction=1.0, window_seconds=10.0)
    assert sorted(map(len, alone)) == sorted(2 * [min(len(a), 160000) for a in audios])
    with pytest.raises(ValueError, match="repeats >= 1"):
        pack_utterances(audios, repeats=0)
    with pytest.raises(ValueError, match="positive speeds"):
        pack_utterances(audios, speeds=(0.0,))
    fast = pack_utterances(audios, repeats=1, single_fraction=1.0, window_seconds=10.0, speeds=(2.0,))
    assert sorted(map(len, fast)) == sorted(min(round(len(a) / 2), 160000) for a in audios)


def test_change_speed_resamples_tempo_and_pitch() -> None:
    t = np.arange(16000) / 16000
    tone = np.sin(2 * np.pi * 200 * t).astype(np.float32)
    assert np.array_equal(change_speed(tone, 1.0), tone)
    fast = change_speed(tone, 1.25)
    assert len(fast) == 12800
    spectrum = np.abs(np.fft.rfft(fast))
    assert abs(np.argmax(spectrum) * 16000 / len(fast) - 250) < 2  # 200 Hz played 1.25x faster: 250 Hz


def test_mel_warp_moves_a_spectral_peak_by_the_factor() -> None:
    assert torch.equal(mel_warp_matrix(80, 1.0), torch.eye(80))
    n_fft, sr = 400, 16000
    filters = torch.as_tensor(np.asarray(__import__("transformers").audio_utils.mel_filter_bank(
        num_frequency_bins=1 + n_fft // 2, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=sr, norm="slaney", mel_scale="slaney")), dtype=torch.float32)  # [freq, mel], Whisper's bank
    peak = torch.zeros(1 + n_fft // 2)
    peak[40] = 1.0  # 1600 Hz
    mel = peak @ filters  # [80]
    hz_of_bin = (filters * (torch.arange(1 + n_fft // 2)[:, None] * sr / n_fft)).sum(0) / filters.sum(0)
    moved = mel_warp_matrix(80, 1.25) @ mel
    centre = (moved * hz_of_bin).sum() / moved.sum()
    assert abs(float(centre) - 2000.0) < 80.0  # 1600 Hz read at f / 1.25: now around 2000 Hz
    feats = torch.randn(5, 80, 7)
    assert torch.equal(warp_features(feats, (1.0,)), feats)
    warped = warp_features(feats, (0.9, 1.1), seed=1)
    assert warped.shape == feats.shape and not torch.allclose(warped, feats)
    with pytest.raises(ValueError, match="alpha > 0"):
        mel_warp_matrix(80, 0.0)


def test_packed_distillation_trains_on_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(EXAMPLE.parent))
    from adaptwin_speaker import TinyProcessor

    teacher = tiny_model(WHISPER)
    student = hf_compress.compress(copy.deepcopy(teacher), CompressionConfig(
        modules={r"encoder\.layers\.\d+\.self_attn$": ProductTwinConfig(rank=3)}), progress=False)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(400, generator=g).numpy(), f"say {i}") for i in range(6)]
    config = lora_config(r=2, alpha=4, target_modules=encoder_targets(student))
    with pytest.raises(ValueError, match="only the distillation objective"):
        train_speaker_adapter(copy.deepcopy(student), TinyProcessor(), data, "x", tmp_path, max_steps=1, pack=2)
    with pytest.raises(ValueError, match="warps= perturbs"):
        train_speaker_adapter(copy.deepcopy(student), TinyProcessor(), data, "x", tmp_path, max_steps=1,
                              warps=(0.9, 1.1))
    with pytest.raises(ValueError, match="pass pack=k"):
        train_speaker_adapter(student, TinyProcessor(), data, "x", tmp_path, max_steps=1, teacher=teacher,
                              speeds=(0.9, 1.1))
    with pytest.raises(ValueError, match="warps= must be a non-empty list of factors > 0"):
        train_speaker_adapter(copy.deepcopy(student), TinyProcessor(), data, "x", tmp_path, max_steps=1,
                              teacher=teacher, warps=(0.0,))
    seen: list = []
    real_warp = adapters_module.warp_features
    monkeypatch.setattr(adapters_module, "warp_features", lambda f, a, s=0: seen.append(tuple(a)) or real_warp(f, a, s))
    _, stats = train_speaker_adapter(student, TinyProcessor(), data, "spk0", tmp_path, config=config, max_steps=2,
                                     teacher=teacher, pack=2, speeds=(0.9, 1.1), warps=(0.9, 1.0, 1.1))
    assert seen == [(0.9, 1.0, 1.1)]
    assert stats["utterances"] == 6 and 2 <= stats["windows"] < 12 and stats["steps"] == 2


def test_bad_inputs_have_clear_errors() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        ProductTwinConfig()
    with pytest.raises(ValueError, match="exactly one of"):
        ProductTwinConfig(rank=2, rank_ratio=0.5)
    with pytest.raises(ValueError, match="positive int"):
        ProductTwinConfig(rank=0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        ProductTwinConfig(rank_ratio=1.5)
    with pytest.raises(ValueError, match="parts"):
        ProductTwinConfig(rank=2, parts="kv")
    with pytest.raises(ValueError, match="exceeds head_dim 12"):
        _compress(tiny_model(WHISPER), ProductTwinConfig(rank=13))
    with pytest.raises(TypeError, match="attention module"):
        _compress(tiny_model(WHISPER), ProductTwinConfig(rank=2), pattern=r"self_attn\.q_proj$")
    with pytest.raises(ValueError, match="RoPE"):
        _compress(tiny_model(LLAMA), ProductTwinConfig(rank=2, parts="qk_vo"), pattern=r"self_attn$")
    assert CompressionConfig.from_json(CompressionConfig(modules={ALL_ATTN: ProductTwinConfig(rank=3)}).to_json()
                                       ).modules[ALL_ATTN] == ProductTwinConfig(rank=3)


@pytest.mark.parametrize("extra", [[], ["--distill", "--pack", "2", "--warps", "0.9", "1.1"],
                                   ["--distill", "--heal-voices", "a", "b"]])
def test_example_script_runs_on_tiny_whisper(tmp_path: Path, extra: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--model", "tiny-random", "--out", str(tmp_path),
                           "--steps", "2", "--n-train", "4", *extra], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "adapters: ['spk0', 'spk1']" in proc.stdout
    assert ("healed on ['a', 'b']" in proc.stdout) == ("--heal-voices" in extra)
    assert (tmp_path / "adapters" / "spk1" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("extra, message", [(["--distill", "--cache-encoder"], "give one"),
                                            (["--pack", "2", "--warps", "0.9"], r"--pack, --warps need\(s\) --distill"),
                                            (["--heal-voices", "a"], r"--heal-voices need\(s\) --distill")])
def test_example_script_refuses_option_clashes_before_any_work(tmp_path: Path, extra: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--model", "tiny-random", "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing compressed or saved
