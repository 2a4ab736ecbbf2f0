"""CTranslate2 Whisper weights -> a transformers ``WhisperForConditionalGeneration`` folder (unfused attention,
HF config, generation config, tokenizer and feature extractor)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ._common import _MOD, COMPLETE, SAMPLE_RATE, _relax_permissions
from .reader import _load_token_table, _read_header, _scalar, _token_id, _weight, read_ct2_model

_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


def _unfuse(variables: dict[str, torch.Tensor], aliases: dict[str, str], src: str, n: int, d_model: int,
            what: str) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Split the fused ``{src}/weight [n·d_model, d_model]`` (and its bias) into ``n`` projections."""
    w = _weight(variables, aliases, f"{src}/weight")
    b = _weight(variables, aliases, f"{src}/bias", required=False)
    if tuple(w.shape) != (n * d_model, d_model):
        raise ValueError(f"{_MOD}: {src}/weight has shape {tuple(w.shape)}, expected fused {what} "
                         f"{(n * d_model, d_model)}.")
    if b is None:
        biases: list[torch.Tensor | None] = [None] * n
    elif b.numel() == n * d_model:
        biases = list(b.split(d_model))
    elif n == 2 and b.numel() == d_model:  # fused K,V: only V carries a bias
        biases = [None, b]
    else:
        raise ValueError(f"{_MOD}: {src}/bias has {b.numel()} entries, expected {n * d_model}.")
    return list(w.split(d_model)), biases


def _split_attention(variables: dict[str, torch.Tensor], aliases: dict[str, str], src: str, dst: str, d_model: int,
                     cross: bool) -> dict[str, torch.Tensor]:
    """Unfuse one CT2 attention block into HF ``q_proj``/``k_proj``/``v_proj``/``out_proj``.

    Self-attention: ``linear_0`` = fused Q,K,V, ``linear_1`` = output; cross-attention: ``linear_0`` = Q,
    ``linear_1`` = fused K,V, ``linear_2`` = output.
    """
    out: dict[str, torch.Tensor] = {}
    if cross:
        kv_w, kv_b = _unfuse(variables, aliases, f"{src}/linear_1", 2, d_model, "K,V")
        weights = [_weight(variables, aliases, f"{src}/linear_0/weight"), *kv_w]
        biases = [_weight(variables, aliases, f"{src}/linear_0/bias", required=False), *kv_b]
    else:
        weights, biases = _unfuse(variables, aliases, f"{src}/linear_0", 3, d_model, "Q,K,V")
    o = f"{src}/linear_{2 if cross else 1}"
    o_w, o_b = _weight(variables, aliases, f"{o}/weight"), _weight(variables, aliases, f"{o}/bias", required=False)
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
