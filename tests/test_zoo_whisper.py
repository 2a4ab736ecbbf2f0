"""CTranslate2 -> transformers Whisper conversion (:mod:`benchmarks.ct2_whisper`).

Unit tests use hand-written ``model.bin`` files and a tiny random Whisper exported by ctranslate2's own converter;
the integration tests convert the real offline checkpoints and check greedy transcripts of espeak-ng speech are
token-identical to the ctranslate2 runtime.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.ct2_whisper import (
    convert_ct2_whisper,
    ct2_transcribe,
    default_cache_root,
    hf_transcribe_ids,
    materialize_whisper,
    read_ct2_model,
)

_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Police are asking anyone with information to come forward.",
    "The government will announce its new budget next week.",
    "She bought three apples, two oranges and a loaf of bread.",
    "Scientists have discovered a new species of frog.",
    "The train was delayed by almost two hours this morning.",
    "The minister refused to comment on the report.",
    "Heavy rain is expected across the coast tomorrow.",
]
VOICES = ["en-us", "en-gb", "en-us+f3"]


# ------------------------------------------------------------------------------------------------------- helpers
def write_ct2_model(path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str] | None = None,
                    version: int = 6, spec: str = "WhisperSpec", revision: int = 3) -> Path:
    """Write a CTranslate2 ``model.bin`` (little-endian, format of ``ModelSpec._serialize``)."""

    def string(text: str) -> bytes:
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = bytearray(struct.pack("<I", version) + string(spec) + struct.pack("<II", revision, len(variables)))
    for name, tensor in variables.items():
        tensor = tensor.contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        out += string(name) + struct.pack("<B", tensor.dim()) + b"".join(struct.pack("<I", d) for d in tensor.shape)
        out += struct.pack("<BI", _DTYPE_IDS[tensor.dtype], len(raw)) + raw
    out += struct.pack("<I", len(aliases or {}))
    for alias, target in (aliases or {}).items():
        out += string(alias) + string(target)
    path.write_bytes(bytes(out))
    return path


def _espeak_clips(folder: Path, sentences: list[str]) -> list[np.ndarray]:
    """16 kHz mono float32 waveforms spoken by espeak-ng (voices rotate), resampled with sox."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install -y espeak-ng sox); CI installs it.")
    clips = []
    for i, text in enumerate(sentences):
        raw, wav = folder / f"raw{i}.wav", folder / f"clip{i}.wav"
        subprocess.run(["espeak-ng", "-v", VOICES[i % len(VOICES)], "-w", str(raw), text], check=True)
        subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True)
        with wave.open(str(wav)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        clips.append(pcm.astype(np.float32) / 32768.0)
    return clips


# ----------------------------------------------------------------------------------------------- read_ct2_model
def test_read_ct2_model_roundtrip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    variables = {
        "decoder/embeddings/weight": torch.randn(5, 3, generator=g).half(),
        "encoder/conv1/weight": torch.randn(4, 2, 3, generator=g),
        "encoder/layer_0/ffn/linear_0/weight": torch.randint(-127, 128, (3, 2), dtype=torch.int8, generator=g),
        "encoder/layer_0/ffn/linear_0/weight_scale": torch.rand(3, generator=g) + 1,
        "encoder/num_heads": torch.tensor(6, dtype=torch.int16),
        "decoder/activation": torch.tensor(3, dtype=torch.int8),
        "some/int32": torch.tensor([1, -2, 70000], dtype=torch.int32),
        "some/bf16": torch.randn(4, generator=g).bfloat16(),
        "some/empty": torch.zeros(0),
    }
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    path = write_ct2_model(tmp_path / "model.bin", variables, aliases)

    got, got_aliases = read_ct2_model(tmp_path)  # a folder holding model.bin works too
    assert got_aliases == aliases
    assert list(got) == list(variables)
    for name, want in variables.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        assert torch.equal(got[name], want), name
    assert read_ct2_model(path)[0]["encoder/num_heads"].item() == 6


@pytest.mark.parametrize("damage, message", [
    ("version", "version 5"),
    ("truncate", "truncated"),
    ("trailing", "trailing"),
    ("bytes", "bytes, expected"),
])
def test_read_ct2_model_rejects_bad_files(tmp_path: Path, damage: str, message: str) -> None:
    variables = {"a/weight": torch.ones(2, 3, dtype=torch.float16)}
    path = write_ct2_model(tmp_path / "model.bin", variables, version=5 if damage == "version" else 6)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-10])
    elif damage == "trailing":
        path.write_bytes(data + b"\0\0")
    elif damage == "bytes":  # byte count field says 14, shape/dtype say 12
        offset = data.index(b"a/weight\0") + len(b"a/weight\0") + 1 + 2 * 4 + 1
        path.write_bytes(data[:offset] + struct.pack("<I", 14) + data[offset + 4:])
    with pytest.raises(ValueError, match=rf"benchmarks\.ct2_whisper: .*{message}"):
        read_ct2_model(path)
    with pytest.raises(ValueError, match="no CTranslate2 model file"):
        read_ct2_model(tmp_path / "missing")


# ------------------------------------------------------------------------- conversion of a tiny random Whisper
_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
             "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


def _tiny_ct2_whisper(folder: Path, quantization: str = "float16", vocab_size: int = 300) -> dict[str, torch.Tensor]:
    """Random tiny HF Whisper exported with ctranslate2's own WhisperLoader + a byte-level tokenizer.json.

    Returns the source state dict (copied before export: ctranslate2 quantizes the float32 arrays in place).
    """
    import transformers
    from ctranslate2.converters.transformers import WhisperLoader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + _SPECIALS
    tokens += [f"<|{i * 0.02:.2f}|>" for i in range(vocab_size - len(tokens))]
    eot, sot = tokens.index("<|endoftext|>"), tokens.index("<|startoftranscript|>")
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS])

    config = transformers.WhisperConfig(
        vocab_size=vocab_size, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=80, num_mel_bins=16, max_source_positions=16,
        max_target_positions=32, decoder_start_token_id=sot, bos_token_id=sot, eos_token_id=eot, pad_token_id=eot,
        suppress_tokens=[], begin_suppress_tokens=[220, eot], init_std=0.2,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-zero biases, so a misplaced bias shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    spec = WhisperLoader().get_model_spec(model)
    spec.register_vocabulary(tokens)
    spec.config.suppress_ids = [7]
    spec.config.suppress_ids_begin = [220, eot]
    spec.config.lang_ids = []
    spec.config.alignment_heads = [[1, 0], [2, 1]]
    spec.validate()
    spec.optimize(quantization=quantization)
    folder.mkdir(parents=True)
    spec.save(str(folder))
    tokenizer.save(str(folder / "tokenizer.json"))
    return source


def test_convert_tiny_random_whisper_matches_source_and_ctranslate2(tmp_path: Path) -> None:
    import ctranslate2
    from transformers import GenerationConfig, GenerationMixin, WhisperForConditionalGeneration, WhisperProcessor

    source = _tiny_ct2_whisper(tmp_path / "ct2")
    out = convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert {"model.safetensors", "config.json", "generation_config.json", "preprocessor_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf-")]  # no temp folder left behind

    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    cfg = model.config
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads, cfg.decoder_attention_heads) == \
        (2, 3, 4, 2)
    assert (cfg.d_model, cfg.encoder_ffn_dim, cfg.decoder_ffn_dim, cfg.num_mel_bins, cfg.vocab_size) == \
        (64, 96, 80, 16, 300)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    want = {k: v.half().float() for k, v in source.items()}  # the CT2 export is fp16
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(got[k].dtype == torch.float32 for k in got)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []

    gen = GenerationConfig.from_pretrained(out)
    assert gen.suppress_tokens == [7] and gen.begin_suppress_tokens == [220, 256]
    assert gen.alignment_heads == [[1, 0], [2, 1]]
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (257, 256, 264)
    assert gen.is_multilingual is False
    processor = WhisperProcessor.from_pretrained(out)
    assert processor.feature_extractor.feature_size == 16
    assert len(processor.tokenizer) == 300
    assert processor.tokenizer.convert_ids_to_tokens([257, 265, 299]) == ["<|startoftranscript|>", "<|0.00|>",
                                                                          "<|0.68|>"]

    # greedy search of HF and the ctranslate2 runtime agree token for token
    feats = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    prompt = [257, 264]
    with torch.no_grad():
        hf = GenerationMixin.generate(model, input_features=feats, decoder_input_ids=torch.tensor([prompt] * 3),
                                      max_new_tokens=10, num_beams=1, do_sample=False)
    runtime = ctranslate2.models.Whisper(str(tmp_path / "ct2"), device="cpu", compute_type="float32")
    results = runtime.generate(ctranslate2.StorageView.from_array(feats.numpy()), [prompt] * 3, beam_size=1,
                               max_length=20)
    assert [r.sequences_ids[0][:10] for r in results] == [s[2:].tolist() for s in hf]

    # a multilingual reading defaults generate() to English transcription
    multi = convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf-multi", english_only=False)
    gen = json.loads((multi / "generation_config.json").read_text())
    assert gen["is_multilingual"] is True and gen["language"] == "<|en|>" and gen["task"] == "transcribe"
    assert gen["lang_to_id"] == {"<|en|>": 258}
    assert gen["task_to_id"] == {"transcribe": 260, "translate": 259}


@pytest.mark.parametrize("quantization, tolerance", [("float32", 0.0), ("int8", 1 / 127), ("int16", 1 / 1024)])
def test_convert_dequantizes_and_unshares(tmp_path: Path, quantization: str, tolerance: float) -> None:
    """float32 exports alias identical tensors (e.g. all-ones layer norms); int8/int16 ones carry ``*_scale``."""
    from transformers import WhisperForConditionalGeneration

    source = _tiny_ct2_whisper(tmp_path / "ct2", quantization=quantization)
    variables, aliases = read_ct2_model(tmp_path / "ct2")
    assert len(aliases) > 1  # the projection alias and more
    if quantization != "float32":
        assert any(v.dtype in (torch.int8, torch.int16) and v.dim() > 1 for v in variables.values())
    got = WhisperForConditionalGeneration.from_pretrained(convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf"))
    got = got.state_dict()
    for name, want in source.items():
        # int8 scales are per output row, int16 ones per tensor: the error is at most half a quantization step
        if quantization == "int8" and want.dim() > 1:
            bound = tolerance * want.abs().amax(dim=tuple(range(1, want.dim())), keepdim=True)
        else:
            bound = tolerance * want.abs().max()
        assert bool(((got[name] - want).abs() <= bound + 1e-7).all()), name


def test_convert_rejects_non_whisper(tmp_path: Path) -> None:
    (tmp_path / "ct2").mkdir()
    write_ct2_model(tmp_path / "ct2" / "model.bin", {"x": torch.zeros(2)}, spec="TransformerSpec")
    (tmp_path / "ct2" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a CTranslate2 'WhisperSpec'"):
        convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf")
    with pytest.raises(ValueError, match="unknown Whisper model"):
        materialize_whisper("whisper-huge", tmp_path)


# ------------------------------------------------------------------------------------------ real checkpoints
def _check_real(name: str, tmp_path: Path, n_clips: int) -> list[str]:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    clips = _espeak_clips(tmp_path, SENTENCES[:n_clips])
    root = default_cache_root() / "ct2_whisper"
    hf_dir = materialize_whisper(name, root)
    assert hf_dir == root / name
    assert materialize_whisper(name, root) == hf_dir  # cached: returns at once
    model = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    processor = WhisperProcessor.from_pretrained(hf_dir)
    ct2_ids = ct2_transcribe(root / f"{name}-ct2", clips)
    hf_ids = hf_transcribe_ids(model, processor, clips)
    assert all(ids for ids in ct2_ids)
    assert hf_ids == ct2_ids, [i for i, (a, b) in enumerate(zip(hf_ids, ct2_ids)) if a != b]
    texts = [t.strip().lower() for t in processor.batch_decode(hf_ids, skip_special_tokens=True)]
    # real speech recognition, not just agreement: most reference words come back
    hits = [len(set(ref.lower().strip(".").replace(",", "").split()) & set(t.replace(",", "").split()))
            / len(ref.split()) for ref, t in zip(SENTENCES, texts)]
    assert float(np.mean(hits)) > 0.6, texts
    return texts


@pytest.mark.integration
def test_whisper_tiny_en_conversion_token_identical_to_ctranslate2(tmp_path: Path) -> None:
    from transformers import WhisperConfig

    _check_real("whisper-tiny.en", tmp_path, n_clips=8)
    cfg = WhisperConfig.from_pretrained(default_cache_root() / "ct2_whisper" / "whisper-tiny.en")
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.encoder_attention_heads, cfg.vocab_size) == \
        (4, 4, 384, 6, 51864)


@pytest.mark.integration
@pytest.mark.slow
def test_whisper_base_conversion_token_identical_to_ctranslate2(tmp_path: Path) -> None:
    from transformers import GenerationConfig

    _check_real("whisper-base", tmp_path, n_clips=4)
    gen = GenerationConfig.from_pretrained(default_cache_root() / "ct2_whisper" / "whisper-base")
    assert gen.is_multilingual and gen.language == "<|en|>" and gen.task == "transcribe"
