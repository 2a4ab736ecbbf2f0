"""Training, PEFT, bad input, atomic saves, push_to_hub and the plan's JSON round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from conftest import ARCHS, Arch, tiny_model
from safetensors.torch import load_file, save_file

import hf_compress
from hf_compress import CompressionConfig, LowRankConfig, LowRankLinear

LLAMA = ARCHS[0]
ATTN = LLAMA.attn_pattern


def _compressed_llama() -> transformers.PreTrainedModel:
    return hf_compress.compress(tiny_model(LLAMA), CompressionConfig(modules={ATTN: LowRankConfig(rank=8)}),
                                progress=False)


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seq: int = 16) -> None:
        g = torch.Generator().manual_seed(1)
        base = torch.randint(0, 96, (4, seq), generator=g)
        self.rows = base.repeat(n // 4, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _train(model: torch.nn.Module, out: Path, steps: int = 12, lr: float = 5e-3) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Repeat())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_reduces_loss_on_compressed_model(tmp_path: Path) -> None:
    model = _compressed_llama().train()
    losses = _train(model, tmp_path)
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    model.save_pretrained(tmp_path / "trained")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    x = {"input_ids": torch.randint(0, 96, (1, 8))}
    assert torch.equal(model.eval()(**x).logits, again(**x).logits)


def test_peft_lora_on_factors_trains_saves_and_loads(tmp_path: Path) -> None:
    import peft

    model = _compressed_llama()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)  # the compressed base; LoRA trains on top of it, frozen
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down", "up"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, lora)
    names = [n for n, _ in pm.named_parameters() if "lora_" in n]
    assert names and all(".self_attn." in n for n in names)
    losses = _train(pm, tmp_path, lr=1e-2)
    assert losses[-1] < losses[0]
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    x = {"input_ids": torch.randint(0, 96, (1, 8))}
    expected = pm.eval()(**x).logits
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(**x).logits, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rank": 0}, "positive int"), ({"rank_ratio": 1.5}, r"in \(0, 1\]"), ({}, "exactly one"),
     ({"rank": 2, "rank_ratio": 0.5}, "exactly one"), ({"rank": 4, "method": "magic"}, "method must be one of")],
)
def test_bad_low_rank_configs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LowRankConfig(**kwargs)


def test_rank_above_min_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"rank 40 exceeds min\(in_features, out_features\) = 32"):
        LowRankLinear.from_dense(torch.nn.Linear(64, 32), rank=40)
    with pytest.raises(ValueError, match=r"self_attn.k_proj: rank 100 exceeds"):
        hf_compress.compress(tiny_model(LLAMA), CompressionConfig(modules={"k_proj": LowRankConfig(rank=100)}),
                             progress=False)


def test_no_saving_rank_is_left_dense_with_warning() -> None:
    model = tiny_model(LLAMA)
    with pytest.warns(UserWarning, match=r"not smaller than the dense weight \(4096\); left dense"):
        hf_compress.compress(model, CompressionConfig(modules={"q_proj": LowRankConfig(rank=32)}), progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_pattern_matching_nothing_warns_with_its_name() -> None:
    with pytest.warns(UserWarning, match=r"pattern 'no_such_proj' matched no module"):
        hf_compress.compress(tiny_model(LLAMA), CompressionConfig(modules={"no_such_proj": LowRankConfig(rank=2)}),
                             progress=False)


def test_non_linear_target_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"compresses nn\.Linear or GPT-2 Conv1D layers only"):
        hf_compress.compress(tiny_model(LLAMA), CompressionConfig(modules={"input_layernorm": LowRankConfig(rank=2)}),
                             progress=False)


def test_unknown_method_and_parameter_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown compression method 'magic'; known methods: \[.*'low_rank'"):
        CompressionConfig.from_dict({"modules": {"q_proj": {"type": "magic", "rank": 2}}})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['rnak'\] for method 'low_rank'"):
        CompressionConfig.from_dict({"modules": {"q_proj": {"type": "low_rank", "rnak": 2}}})
    with pytest.raises(TypeError, match="must be a method config"):
        CompressionConfig(modules={"q_proj": 3})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        CompressionConfig(modules={"q_proj(": LowRankConfig(rank=2)})


def test_unsupported_architecture_lists_supported_ones() -> None:
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                 num_attention_heads=2, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"architecture 'opt' is not supported; supported model types: \['llama'"):
        hf_compress.compress(model, CompressionConfig(modules={"q_proj": LowRankConfig(rank=2)}), progress=False)


def test_missing_factor_tensor_is_a_clear_error(tmp_path: Path) -> None:
    _compressed_llama().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.self_attn.q_proj.up.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks factor tensor\(s\) \['model.layers.1.self_attn.q_proj.up.weight'\]"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    model = _compressed_llama()
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")  # a file the model save does not own
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.up.weight.add_(1.0)
    with mock.patch("transformers.modeling_utils.safe_save_file", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not [p for p in tmp_path.parent.iterdir() if "hf_compress-tmp" in p.name]
    model.save_pretrained(tmp_path)  # a completed save replaces the weights and keeps foreign files
    assert (tmp_path / "tokenizer_config.json").read_text() == "{}"
    assert (tmp_path / "model.safetensors").read_bytes() != before["model.safetensors"]


def _assert_reloads_exactly(model: transformers.PreTrainedModel, path: Path) -> None:
    again = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = LLAMA.inputs()["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_save_links_foreign_files_keeps_symlinks_and_the_umask_mode(tmp_path: Path) -> None:
    model = _compressed_llama()
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "optimizer.safetensors").write_bytes(b"x" * 1024)  # a Trainer's file beside the model
    (real / "model_notes.txt").write_text("mine")  # starts with "model" but is not a checkpoint file
    link.symlink_to(real, target_is_directory=True)
    inode = (real / "optimizer.safetensors").stat().st_ino
    model.save_pretrained(link)
    assert link.is_symlink() and (real / "model.safetensors").exists()
    assert (real / "optimizer.safetensors").stat().st_ino == inode  # hard-linked, not copied
    assert (real / "model_notes.txt").read_text() == "mine"
    umask = os.umask(0)
    os.umask(umask)
    assert real.stat().st_mode & 0o777 == 0o777 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    _assert_reloads_exactly(model, link)


def test_save_into_a_mount_point_replaces_files_one_by_one(tmp_path: Path) -> None:
    model = _compressed_llama()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "tokenizer.json").write_text("{}")
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:  # a mount point cannot be renamed
        if Path(src) == tmp_path:
            raise OSError(16, "Device or resource busy")
        real_replace(src, dst)

    with mock.patch("os.path.ismount", side_effect=lambda p: Path(p) == tmp_path), \
            mock.patch("os.replace", replace):
        model.save_pretrained(tmp_path)  # staged inside the mount point, files moved one by one
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                     "modeling_hf_compress.py", "tokenizer.json"]
    _assert_reloads_exactly(model, tmp_path)


@pytest.mark.parametrize("why", ["current-directory", "read-only-parent"])
def test_save_into_a_folder_that_cannot_be_swapped_keeps_it(why: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``save_pretrained(".")`` must not rename the process's current directory away; a folder whose parent is
    read-only cannot be swapped either. Both get their files replaced in place; the folder's mode is kept."""
    model = _compressed_llama()
    target = tmp_path / "ckpt"
    target.mkdir()
    target.chmod(0o750)
    (target / "tokenizer.json").write_text("{}")
    inode = target.stat().st_ino
    if why == "current-directory":
        monkeypatch.chdir(target)
        model.save_pretrained(".")
        assert Path.cwd() == target and Path("config.json").exists()
    else:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
        model.save_pretrained(target)
    assert target.stat().st_ino == inode and target.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                         "model.safetensors", "modeling_hf_compress.py",
                                                         "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    _assert_reloads_exactly(model, target)


def test_a_replaced_folder_keeps_its_mode(tmp_path: Path) -> None:
    model = _compressed_llama()
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    target.chmod(0o750)
    model.save_pretrained(target)  # swapped whole: the new folder takes the old one's mode
    assert target.stat().st_mode & 0o777 == 0o750


@pytest.fixture(autouse=True)
def _no_hub_card(monkeypatch: pytest.MonkeyPatch) -> None:
    """push_to_hub reads the repo's card first; offline that retries for half a minute: no repo card here."""
    from hf_compress import saving

    monkeypatch.setattr(saving, "_hub_card", lambda repo_id, token: None)


def test_push_to_hub_uploads_the_save_path(tmp_path: Path) -> None:
    model = _compressed_llama()
    seen: dict[str, object] = {}

    def fake_upload(self, repo_id: str, folder_path: str, **kwargs: object) -> str:
        folder = Path(folder_path)
        seen["files"] = sorted(p.name for p in folder.iterdir())
        seen["config"] = json.loads((folder / "config.json").read_text())
        seen["card"] = (folder / "README.md").read_text()
        return f"https://hub/{repo_id}"

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")) as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload):
        url = model.push_to_hub("me/tiny", private=True, tags=["speech"])
    create.assert_called_once_with("me/tiny", private=True, exist_ok=True)
    assert url == "https://hub/me/tiny"
    assert {"config.json", "model.safetensors", "modeling_hf_compress.py", "README.md"} <= set(seen["files"])
    assert seen["config"]["auto_map"]["AutoModelForCausalLM"] == "modeling_hf_compress.CompressedLlamaForCausalLM"
    assert "library_name: transformers" in seen["card"] and "hf_compress" in seen["card"]
    assert "- speech" in seen["card"]


def test_save_pretrained_push_to_hub_passes_privacy_and_message(tmp_path: Path) -> None:
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")) as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder", return_value="url") as upload:
        _compressed_llama().save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/tiny", private=True,
                                            commit_message="msg")
    create.assert_called_once_with("me/tiny", private=True, exist_ok=True)
    assert upload.call_args.kwargs["commit_message"] == "msg"
    assert (tmp_path / "out" / "model.safetensors").exists()
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
            mock.patch("huggingface_hub.HfApi.create_branch") as branch, \
            mock.patch("huggingface_hub.HfApi.upload_folder", return_value="url") as upload:
        _compressed_llama().push_to_hub("me/tiny", revision="v2")  # a new branch is created first, as transformers
        _compressed_llama().save_pretrained(tmp_path / "pr", push_to_hub=True, repo_id="me/tiny", revision="refs/pr/1")
    branch.assert_called_once_with("me/tiny", branch="v2", exist_ok=True)
    assert [c.kwargs["revision"] for c in upload.call_args_list] == ["v2", "refs/pr/1"]
    with mock.patch("huggingface_hub.HfApi.create_repo") as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder") as upload:
        _compressed_llama().save_pretrained(tmp_path / "rank1", push_to_hub=True, is_main_process=False)
    create.assert_not_called()
    upload.assert_not_called()


def test_plain_auto_class_with_compression_config_is_a_clear_error(tmp_path: Path) -> None:
    """transformers routes unknown kwargs into the config, where a plan would replace the recorded layers."""
    _compressed_llama().save_pretrained(tmp_path)
    plan = CompressionConfig(modules={LLAMA.mlp_pattern: LowRankConfig(rank=4)})
    with pytest.raises(ValueError, match=r"compression_config= is not a loading option here.*AutoCompressedModel"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, compression_config=plan)


def test_compression_config_json_round_trip(tmp_path: Path) -> None:
    cfg = CompressionConfig(modules={ATTN: LowRankConfig(rank_ratio=0.5), "mlp.down_proj": LowRankConfig(rank=4)},
                            skip_modules=["layers.0."])
    again = CompressionConfig.from_json(cfg.to_json())
    assert again == cfg
    cfg.to_json(tmp_path / "plan.json")
    assert CompressionConfig.from_json(tmp_path / "plan.json") == cfg
    assert json.loads(cfg.to_json())["version"] == 1
    with pytest.raises(ValueError, match="newer than this hf_compress supports"):
        CompressionConfig.from_dict({"version": 99, "modules": {}})
    recorded = {**cfg.to_dict(), "layers": {}, "base_model": "some/model"}  # a compressed model's config entry
    assert CompressionConfig.from_dict(recorded) == cfg


def test_skip_modules_and_pattern_semantics() -> None:
    model = tiny_model(LLAMA)
    cfg = CompressionConfig(modules={r"self_attn\.q_proj$": LowRankConfig(rank=4)},
                            skip_modules=[r"layers\.0\.self_attn\.q_proj"])
    hf_compress.compress(model, cfg, progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, LowRankLinear)
    assert hf_compress.config.matches("q_proj", "model.layers.0.self_attn.q_proj")
    assert not hf_compress.config.matches("proj", "model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_in_place_compression_keeps_one_shared_config(arch: Arch) -> None:
    """``compress`` re-types the config: the inner models and attention layers must read the same object (config
    edits take effect everywhere) and keep what ``to_dict`` leaves out, such as the attention implementation."""
    model = tiny_model(arch)
    attn = model.config._attn_implementation
    readers = [name for name, m in model.named_modules() if getattr(m, "config", None) is model.config]
    dense_config = model.config  # may be shared with other models: copied, not re-typed
    hf_compress.compress(model, CompressionConfig(modules={arch.attn_pattern: LowRankConfig(rank=2)}), progress=False)
    assert type(model.config).__name__.startswith("Compressed") and model.config._attn_implementation == attn
    assert [n for n, m in model.named_modules() if getattr(m, "config", None) is model.config] == readers
    assert model.config is not dense_config and not type(dense_config).__name__.startswith("Compressed")


def test_in_place_compression_keeps_output_hidden_states() -> None:
    """A model re-typed in place still returns hidden states (transformers keeps a per-class output-capture
    registry, filled when an instance is built). Fresh process: no other compressed BERT was ever built there."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import ARCHS, tiny_model
        import hf_compress
        from hf_compress import CompressionConfig, LowRankConfig
        bert = [a for a in ARCHS if a.name == "bert"][0]
        model = hf_compress.compress(tiny_model(bert), CompressionConfig(modules={{"query": LowRankConfig(rank=2)}}),
                                     progress=False)
        out = model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
        print(len(out.hidden_states) if out.hidden_states is not None else "None")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == str(ARCHS[2].make_config().num_hidden_layers + 1)


def test_model_card_links_hub_ids_but_not_local_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_compress.cards import model_card

    model = _compressed_llama()
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for base, linked in (("models/tiny", False), ("HuggingFaceTB/SmolLM2-135M", True)):
        model.config.compression_config = {**model.config.compression_config, "base_model": base}
        assert (model_card(model).data.base_model == base) is linked
    assert "base_model_relation" not in model_card(model).data.to_dict()  # low rank is not "quantized"


def test_base_model_is_recorded_without_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_compress.cards import portable_base_model

    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "work" / "dense").mkdir(parents=True)
    (tmp_path / "work" / "out" / "checkpoint-500").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    for given, recorded in (("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"), ("gpt2", "gpt2"),
                            (str(tmp_path / "work" / "dense"), "dense"), ("dense", "dense"), ("./dense/", "dense"),
                            (str(snapshot), "HuggingFaceTB/SmolLM2-135M"), (Path("/"), None), (None, None),
                            ("out/checkpoint-500", "checkpoint-500")):  # a local folder, though shaped like an id
        assert portable_base_model(given) == recorded, given
    dense = tiny_model(ARCHS[0])
    dense.save_pretrained(tmp_path / "work" / "dense")
    plan = CompressionConfig(modules={"q_proj": LowRankConfig(rank=2)})
    model = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(str(tmp_path / "work" / "dense"),
                                                                       compression_config=plan)
    model.save_pretrained(tmp_path / "out")
    assert str(tmp_path) not in (tmp_path / "out" / "config.json").read_text()  # no absolute path is saved
    assert model.config.compression_config["base_model"] == "dense"


def test_a_plain_save_replaces_an_earlier_variant_save(tmp_path: Path) -> None:
    model = _compressed_llama()
    model.save_pretrained(tmp_path, variant="v1", max_shard_size="20KB")
    assert any(".v1" in p.name for p in tmp_path.iterdir())
    model.save_pretrained(tmp_path)
    assert not any(".v1" in p.name for p in tmp_path.iterdir())  # were kept as foreign files
    _assert_reloads_exactly(model, tmp_path)


def test_model_card_table_escapes_pipes_in_patterns() -> None:
    from hf_compress.cards import model_card

    model = hf_compress.compress(tiny_model(ARCHS[0]), CompressionConfig(modules={
        r"self_attn\.(q|k|v|o)_proj$": LowRankConfig(rank=4)}), progress=False)
    rows = [line for line in str(model_card(model)).splitlines() if "_proj$" in line]
    assert len(rows) == 1 and rows[0].count("|") - rows[0].count(r"\|") == 4  # three cells, not six


@pytest.mark.parametrize("table", ["tt", "codebook"])
def test_num_parameters_excludes_compressed_token_tables(table: str) -> None:
    from hf_compress.methods.jlcm import CodebookConfig
    from hf_compress.methods.tt_embedding import TTEmbeddingConfig

    cfg = TTEmbeddingConfig() if table == "tt" else CodebookConfig(bits=4, method="kmeans")
    model = hf_compress.compress(tiny_model(ARCHS[0]), CompressionConfig(modules={"embed_tokens": cfg}),
                                 progress=False)
    emb = model.get_input_embeddings()
    table_params = sum(p.numel() for p in emb.parameters())
    assert table_params > 0
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - table_params
    for p in emb.parameters():
        p.requires_grad_(False)
    assert model.num_parameters(only_trainable=True, exclude_embeddings=True) == model.num_parameters(
        only_trainable=True)


def test_safe_serialization_false_still_writes_safetensors_with_a_warning(tmp_path: Path) -> None:
    model = _compressed_llama()
    with pytest.warns(UserWarning, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    _assert_reloads_exactly(model, tmp_path)


def test_a_written_model_card_is_kept_and_the_save_pushes_only_its_files(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A card someone wrote (no generated-card marker) survives re-saves and pushes, locally and on the Hub, as
    transformers keeps it; a generated card is rewritten. save_pretrained(push_to_hub=True) uploads the files the
    save wrote, not the folder's others (secrets, trainer state)."""
    from huggingface_hub import ModelCard

    from hf_compress import saving
    from hf_compress.cards import GENERATED

    model, target = _compressed_llama(), tmp_path / "ckpt"
    model.save_pretrained(target)
    assert GENERATED in (target / "README.md").read_text()
    (target / "README.md").write_text("# my own card\n")
    (target / "secrets.env").write_text("TOKEN=x")
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", return_value="url") as upload:
        model.save_pretrained(target, push_to_hub=True, repo_id="me/tiny")
    assert (target / "README.md").read_text() == "# my own card\n" and (target / "secrets.env").exists()
    sent = upload.call_args.kwargs["allow_patterns"]
    assert "model.safetensors" in sent and "config.json" in sent and "secrets.env" not in sent
    assert "README.md" not in sent  # the user's card is not the save's
    monkeypatch.undo()  # the real _hub_card, reading a mocked Hub card
    seen: dict[str, str] = {}

    def fake_upload(self: object, repo_id: str, folder_path: str, **kwargs: object) -> str:
        seen["card"] = (Path(folder_path) / "README.md").read_text()
        return "url"

    real_load = ModelCard.load
    for hub_card, kept in (("---\nlicense: mit\n---\n# theirs\n", True), (None, False)):
        def load(repo_or_path: object, *args: object, text: str | None = hub_card, **kwargs: object) -> ModelCard:
            if repo_or_path != "me/tiny":  # a local file
                return real_load(repo_or_path, *args, **kwargs)
            if text is None:
                raise OSError("no card on the Hub")
            return ModelCard(text)

        with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
                mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload), \
                mock.patch("huggingface_hub.ModelCard.load", load):
            model.push_to_hub("me/tiny", tags=["speech"])
        assert ("# theirs" in seen["card"]) is kept and (GENERATED in seen["card"]) is not kept
        assert "- speech" in seen["card"]
    assert saving._hub_card is not None



def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path: Path) -> None:
    model, target = _compressed_llama(), tmp_path / "ckpt"
    model.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")
    before = sorted(p.name for p in target.iterdir())
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:  # the new folder cannot be moved in (killed, full disk ...)
        if Path(dst) == target and ".hf_compress-tmp-" in str(src):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    with mock.patch("os.replace", replace), pytest.raises(OSError, match="No space left"):
        _compressed_llama().save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == before and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    _assert_reloads_exactly(model, target)


@pytest.mark.parametrize("edit", ["drop_entry", "drop_rank", "not_a_dict"])
def test_a_hand_edited_compression_config_is_a_clear_error(edit: str, tmp_path: Path) -> None:
    _compressed_llama().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    layers = cfg["compression_config"]["layers"]
    name = next(n for n, spec in layers.items() if spec["type"] == "low_rank_linear")
    if edit == "drop_entry":  # its stored factors would be unexpected keys and the dense weight random
        del layers[name]
        match = rf"stores compressed tensors for \['{name}'\], which config.json's compression_config does not list"
    else:
        if edit == "drop_rank":
            del layers[name]["rank"]
        else:
            layers[name] = "low_rank_linear"
        match = rf"compression_config.layers\['{name}'\] cannot be built"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_damaged_packed_buffers_are_refused_not_decoded(tmp_path: Path) -> None:
    """A row permutation that is not one (or codes past the codebook) would decode through uninitialized memory."""
    from hf_compress.methods.jlcm import CodebookConfig

    model = hf_compress.compress(tiny_model(LLAMA), CompressionConfig(
        modules={"mlp.up_proj": CodebookConfig(bits=3, method="kmeans", kmeans_iters=2)}), progress=False)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = next(k for k in tensors if k.endswith("up_proj.perm"))
    tensors[key] = torch.zeros_like(tensors[key])  # every row "comes from" row 0
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    damaged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"CodebookLinear\(64->\d+\): the stored row permutation or codes are out"):
        damaged(**LLAMA.inputs())


def test_a_card_without_the_marker_is_kept_and_hub_cards_kept_on_save_push(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card says "delete this line to keep your edits": a card whose marker line was deleted, then edited, is
    kept (it was rewritten because it still had the template's opening sentence)."""
    from hf_compress import saving
    from hf_compress.cards import GENERATED

    model, target = _compressed_llama(), tmp_path / "ckpt"
    model.save_pretrained(target)
    edited = (target / "README.md").read_text().replace(GENERATED + "\n", "") + "\nMy notes.\n"
    (target / "README.md").write_text(edited)
    model.save_pretrained(target)
    assert (target / "README.md").read_text() == edited
    monkeypatch.setattr(saving, "_hub_card", lambda repo_id, token: object())  # the repo has its own card
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", return_value="url") as upload:
        model.save_pretrained(target, push_to_hub=True, repo_id="me/tiny")
    assert "README.md" not in upload.call_args.kwargs["allow_patterns"]


@pytest.mark.parametrize("how", ["push_to_hub", "save_pretrained"])
def test_pushed_card_names_the_repo_and_no_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      how: str) -> None:
    """The generated card uploaded by a push loads from the repo id (it said "path/to/this/model") and shows no
    absolute local path of the base checkpoint in its title or text."""
    from hf_compress import saving

    dense = tiny_model(LLAMA)
    dense.save_pretrained(tmp_path / "deep" / "local-base")
    model = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(
        tmp_path / "deep" / "local-base", compression_config=CompressionConfig(modules={ATTN: LowRankConfig(rank=8)}))
    monkeypatch.setattr(saving, "_hub_card", lambda repo_id, token: None)  # no card on the Hub yet
    cards: list[str] = []
    upload = mock.Mock(side_effect=lambda **kw: cards.append((Path(kw["folder_path"]) / "README.md").read_text()))
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", upload):
        if how == "push_to_hub":
            model.push_to_hub("me/tiny")
        else:
            model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/tiny")
    (card,) = cards
    assert 'from_pretrained("me/tiny"' in card and "path/to/this/model" not in card
    assert "# me/tiny (compressed with hf_compress)" in card and "a local checkpoint (`local-base`)" in card
    assert str(tmp_path) not in card


@pytest.mark.parametrize("how", ["push_to_hub", "save_pretrained", "cli"])
def test_a_bare_repo_name_is_resolved_before_the_card_and_a_hub_card_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """push("tiny") goes to "me/tiny" (the Hub's name for it): the repo's own card is looked up there and kept (the
    CLI too), a generated card names "me/tiny", and the model then names the repo (PEFT records it for adapters)."""
    from hf_compress import cli, saving

    model = _compressed_llama()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    asked: list[str] = []
    cards: list[str] = []
    hub_card = mock.Mock(save=lambda path: Path(path).write_text("the user's card"))
    upload = mock.Mock(side_effect=lambda **kw: cards.append((Path(kw["folder_path"]) / "README.md").read_text()))
    for hub_has_card in (True, False):
        asked.clear()
        cards.clear()
        monkeypatch.setattr(saving, "_hub_card", lambda repo_id, token, has=hub_has_card: (
            asked.append(repo_id) or (hub_card if has else None)))
        with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
                mock.patch("huggingface_hub.HfApi.upload_folder", upload):
            if how == "push_to_hub":
                model.push_to_hub("tiny", commit_description="why")
            elif how == "save_pretrained":
                model.save_pretrained(folder, push_to_hub=True, commit_description="why")
            else:
                assert cli.main(["push", str(folder), "tiny"]) == 0
        kwargs = upload.call_args.kwargs
        assert asked == ["me/tiny"] and kwargs["repo_id"] == "me/tiny"
        if how != "cli":
            assert kwargs["commit_description"] == "why" and model.name_or_path == "me/tiny"
        if how == "push_to_hub":  # a temporary folder holding the repo's own card or one for me/tiny
            assert (cards[0] == "the user's card") is hub_has_card
        else:  # the folder's generated card is left out, or rewritten for me/tiny
            uploaded_card = ("README.md" in kwargs["allow_patterns"] if "allow_patterns" in kwargs
                             else "README.md" not in kwargs.get("ignore_patterns", []))
            assert uploaded_card is not hub_has_card
        assert hub_has_card or 'from_pretrained("me/tiny"' in cards[0]


def test_a_checkpoint_holding_a_local_base_path_saves_it_portably(tmp_path: Path) -> None:
    """Checkpoints saved before base_model was recorded portably held the absolute local path: a save drops it."""
    model = _compressed_llama()
    model.config.compression_config = {**model.config.compression_config, "base_model": "/home/alice/models/base"}
    model.save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "config.json").read_text()
    assert "/home/alice" not in text and json.loads(text)["compression_config"]["base_model"] == "base"


def test_the_model_names_no_checkpoint_until_saved(tmp_path: Path) -> None:
    """After compress-on-load, in-place compression or a vocabulary edit no checkpoint reproduces the model: its
    name_or_path (PEFT's adapter base) is cleared, and a save sets it to the saved folder."""
    import peft

    tiny_model(LLAMA).save_pretrained(tmp_path / "dense")
    model = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(
        tmp_path / "dense", compression_config=CompressionConfig(modules={ATTN: LowRankConfig(rank=8)}))
    assert model.name_or_path == "" and model.config.name_or_path == str(tmp_path / "dense")  # tokenizers: kept
    unsaved = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert unsaved.peft_config["default"].base_model_name_or_path is None  # not the dense checkpoint
    model = unsaved.unload()
    model.save_pretrained(tmp_path / "c")
    assert model.name_or_path == str(tmp_path / "c")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                    init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    again = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert isinstance(again.get_base_model().model.layers[0].self_attn.q_proj.base_layer, LowRankLinear)
    inputs = LLAMA.inputs()
    assert torch.equal(again(**inputs).logits, pm(**inputs).logits)
    model = hf_compress.compress(tiny_model(LLAMA), CompressionConfig(modules={ATTN: LowRankConfig(rank=8)}),
                                 progress=False)
    assert model.name_or_path == model.model.name_or_path == ""  # the inner model too
    model.save_pretrained(tmp_path / "c2")
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=OSError("offline")), \
            pytest.raises(OSError, match="offline"):
        model.push_to_hub("tiny")
    assert model.name_or_path == str(tmp_path / "c2")  # not the push's deleted temporary folder
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
            pytest.raises(TypeError):
        model.push_to_hub("tiny", tags=5)  # failing after the temporary save, before the upload
    assert model.name_or_path == str(tmp_path / "c2")
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=OSError("offline")), \
            pytest.raises(OSError, match="offline"):
        model.save_pretrained(tmp_path / "c4", push_to_hub=True)
    assert model.name_or_path == str(tmp_path / "c4")  # saved there, whatever the upload did
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
            mock.patch("huggingface_hub.HfApi.create_branch"), \
            mock.patch("huggingface_hub.HfApi.upload_folder", return_value="url"):
        model.push_to_hub("tiny", create_pr=True)  # main does not hold this model
        assert model.name_or_path == str(tmp_path / "c4")
        model.save_pretrained(tmp_path / "c3", push_to_hub=True, repo_id="tiny", revision="dev")
        assert model.name_or_path == str(tmp_path / "c3")
        model.push_to_hub("tiny")
        assert model.name_or_path == "me/tiny"
