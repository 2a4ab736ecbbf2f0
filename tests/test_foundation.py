"""The Hugging Face life cycle on every covered architecture, with truncated-SVD low-rank layers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ARCHS, Arch, tiny_model
from conftest import model_output as _out
from conftest import short_generate as _generate

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig, LowRankLinear


def _plan(arch: Arch, ratio: float = 0.5) -> CompressionConfig:
    return CompressionConfig(modules={arch.attn_pattern: LowRankConfig(rank_ratio=ratio)})


def test_compress_generate_save_reload_exact(arch: Arch, tmp_path: Path) -> None:
    model = tiny_model(arch)
    inputs = arch.inputs()
    dense_params = sum(p.numel() for p in model.parameters())
    hf_compress.compress(model, _plan(arch), progress=False)
    assert type(model).__name__ == f"Compressed{arch.model_class.__name__}"
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < dense_params
    logits = _out(model, inputs)
    if arch.generates:
        assert _generate(model, arch, inputs).shape[0] == 2
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_hf_compress.py", "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    pipeline = {"llama": "text-generation", "gpt2": "text-generation", "bert": "feature-extraction",
                "whisper": "automatic-speech-recognition"}[arch.name]
    assert f"pipeline_tag: {pipeline}" in (tmp_path / "README.md").read_text()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"hf_compress_{arch.make_config().model_type}"
    assert config["compression_config"]["layers"]
    again = arch.auto_class.from_pretrained(tmp_path)
    assert type(again) is type(model)
    assert torch.equal(_out(again, inputs), logits)
    if arch.generates:
        assert torch.equal(_generate(again, arch, inputs), _generate(model, arch, inputs))


def test_compress_on_load_matches_in_place(dense_dir: tuple[Arch, str]) -> None:
    arch, path = dense_dir
    loaded = arch.compressed_auto.from_pretrained(path, compression_config=_plan(arch))
    in_place = hf_compress.compress(arch.auto_class.from_pretrained(path), _plan(arch), progress=False)
    inputs = arch.inputs()
    assert type(loaded) is type(in_place)
    assert torch.equal(_out(loaded, inputs), _out(in_place, inputs))
    assert loaded.config.compression_config["base_model"] == Path(path).name  # no local path


# Each row's other Auto class: the base model of a task checkpoint, or (BERT) a task model of a base checkpoint.
OTHER_AUTO = {"llama": transformers.AutoModel, "gpt2": transformers.AutoModel, "whisper": transformers.AutoModel,
              "bert": transformers.AutoModelForMaskedLM}


def test_other_auto_class_rebuilds_the_compressed_base_model(arch: Arch, tmp_path: Path) -> None:
    model = hf_compress.compress(tiny_model(arch), _plan(arch), progress=False)
    model.save_pretrained(tmp_path)
    other = OTHER_AUTO[arch.name].from_pretrained(tmp_path)
    assert type(other).__name__.startswith("Compressed")
    base, other_base = (getattr(m, m.base_model_prefix, m) for m in (model, other))
    count = [sum(isinstance(m, LowRankLinear) for m in b.modules()) for b in (base, other_base)]
    assert count[0] > 0 and count[0] == count[1]
    inputs = arch.inputs()
    with torch.no_grad():
        assert torch.equal(base(**inputs).last_hidden_state, other_base(**inputs).last_hidden_state)


def test_compression_config_naming_a_missing_module_is_rejected(tmp_path: Path) -> None:
    arch = ARCHS[0]
    hf_compress.compress(tiny_model(arch), _plan(arch), progress=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    layers = config["compression_config"]["layers"]
    layers["model.layers.7.self_attn.q_proj"] = layers.pop("model.layers.1.self_attn.q_proj")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names module 'model\.layers\.7\.self_attn\.q_proj'"):
        arch.auto_class.from_pretrained(tmp_path)


def test_trust_remote_code_in_fresh_process(tmp_path: Path) -> None:
    """Reload every architecture in a new interpreter that never imports hf_compress itself: only the checkpoint's
    ``auto_map`` remote code can register the classes (importing hf_compress first would register them anyway)."""
    tensors = {}
    for arch in ARCHS:
        model = hf_compress.compress(tiny_model(arch), _plan(arch), progress=False)
        model.save_pretrained(tmp_path / arch.name)
        inputs = arch.inputs()
        tensors[f"{arch.name}/expected"] = _out(model, inputs)
        tensors.update({f"{arch.name}/in/{k}": v for k, v in inputs.items()})
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "tensors.safetensors")
    for arch in ARCHS:  # one interpreter per architecture: the first load's remote code imports hf_compress
        script = textwrap.dedent(f"""
            import sys, torch, transformers
            from safetensors.torch import load_file
            t = load_file({str(tmp_path / 'tensors.safetensors')!r})
            assert "hf_compress" not in sys.modules
            model = transformers.{arch.auto_class.__name__}.from_pretrained({str(tmp_path / arch.name)!r},
                                                                             trust_remote_code=True)
            inputs = {{k.split("/")[-1]: v for k, v in t.items() if k.startswith({arch.name!r} + "/in/")}}
            with torch.no_grad():
                out = model(**inputs)
            out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            print(type(model).__name__.startswith("Compressed"), torch.equal(out, t[{arch.name!r} + "/expected"]))
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.split() == ["True", "True"], arch.name


@pytest.mark.parametrize("seed", range(12))
def test_full_rank_svd_is_exact(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = (int(x) for x in torch.randint(1, 70, (2,), generator=g))
    bias = bool(seed % 2)
    dense = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(n_out, n_in, generator=g))
        if bias:
            dense.bias.copy_(torch.randn(n_out, generator=g))
    low = LowRankLinear.from_dense(dense, rank=min(n_in, n_out))
    x = torch.randn(5, n_in, generator=g)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-5)
    assert (low.in_features, low.out_features) == (n_in, n_out)


def test_full_rank_svd_of_gpt2_conv1d_is_exact() -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight [16, 24]
    torch.nn.init.normal_(conv.weight)
    low = LowRankLinear.from_dense(conv, rank=16)
    x = torch.randn(3, 16)
    torch.testing.assert_close(low(x), conv(x), atol=1e-5, rtol=1e-5)


def test_truncated_svd_is_optimal_rank_r() -> None:
    """The rank-r error equals the tail singular values (Eckart–Young), so truncation is done right."""
    dense = torch.nn.Linear(40, 30, bias=False)
    low = LowRankLinear.from_dense(dense, rank=7)
    s = torch.linalg.svdvals(dense.weight.detach())
    err = torch.linalg.matrix_norm(low.weight - dense.weight.detach())
    torch.testing.assert_close(err, s[7:].norm(), atol=1e-4, rtol=1e-4)


def test_rank_ratio_controls_parameters() -> None:
    cfg = LowRankConfig(rank_ratio=0.5)
    rank = cfg.rank_for(64, 64)
    assert rank == 16 and rank * 128 <= 0.5 * 64 * 64


def test_compressed_models_keep_the_family_model_type(arch: Arch, tmp_path: Path) -> None:
    """transformers, PEFT and pipelines branch on ``config.model_type``; only config.json carries the prefix."""
    model = hf_compress.compress(tiny_model(arch), _plan(arch), progress=False)
    family = arch.make_config().model_type
    assert model.config.model_type == family
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == f"hf_compress_{family}"
    assert arch.auto_class.from_pretrained(tmp_path).config.model_type == family


def test_peft_default_targets_apply_to_a_compressed_llama() -> None:
    from peft import LoraConfig, get_peft_model

    model = hf_compress.compress(tiny_model(ARCHS[0]), CompressionConfig(modules={r"mlp\.down_proj$": LowRankConfig(
        rank_ratio=0.5)}), progress=False)
    peft_model = get_peft_model(model, LoraConfig(r=4))  # no target_modules: the family's defaults (q/v_proj)
    assert any(n.endswith("q_proj.lora_A.default.weight") for n, _ in peft_model.named_parameters())


def test_whisper_generate_keeps_a_user_decoder_prompt() -> None:
    arch = next(a for a in ARCHS if a.name == "whisper")
    model = hf_compress.compress(tiny_model(arch), _plan(arch), progress=False)
    feats = arch.inputs()["input_features"][:1]
    prompt = {"decoder_input_ids": torch.tensor([[5, 7]]), "max_new_tokens": 2}
    out, dense_out = (m.generate(feats, **prompt) for m in (model, tiny_model(arch)))
    assert out.shape == dense_out.shape  # generate's Whisper branch: no start token put in front of the prompt


def test_auto_compressed_factories_take_config_kwargs_and_output_loading_info(tmp_path: Path) -> None:
    """As transformers' Auto classes: config attributes given to from_pretrained (num_labels, use_cache) set the
    config (they reached the model constructor: TypeError), and output_loading_info=True returns (model, info)
    (AttributeError on the tuple)."""
    bert = next(a for a in ARCHS if a.name == "bert")
    tiny_model(bert).save_pretrained(tmp_path / "bert")
    plan = CompressionConfig(modules={bert.attn_pattern: LowRankConfig(rank_ratio=0.5)})
    clf = hf_compress.AutoCompressedModelForSequenceClassification.from_pretrained(
        tmp_path / "bert", compression_config=plan, num_labels=3)
    assert clf.config.num_labels == 3 and clf.classifier.out_features == 3
    clf.save_pretrained(tmp_path / "clf")
    again = hf_compress.AutoCompressedModelForSequenceClassification.from_pretrained(tmp_path / "clf",
                                                                                    id2label={0: "a", 1: "b", 2: "c"})
    assert again.config.id2label[2] == "c"
    llama = next(a for a in ARCHS if a.name == "llama")
    tiny_model(llama).save_pretrained(tmp_path / "llama")
    plan = CompressionConfig(modules={llama.attn_pattern: LowRankConfig(rank_ratio=0.5)})
    lm = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(tmp_path / "llama", compression_config=plan,
                                                                   use_cache=False)
    assert lm.config.use_cache is False
    lm, info = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(
        tmp_path / "llama", compression_config=plan, output_loading_info=True)
    assert isinstance(lm, torch.nn.Module) and not info["missing_keys"] and lm.config.compression_config["layers"]
