"""Every script in examples/ runs on a tiny model (subprocess, as a user runs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ARCHS, tiny_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # tiny models: threads only contend
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          check=False, timeout=300, env=env)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in ("llama", "gpt2")], ids=lambda a: a.name)
def test_compress_and_push_example(arch, tmp_path: Path) -> None:
    tiny_model(arch).save_pretrained(tmp_path / "dense")
    proc = _run("compress_and_push.py", str(tmp_path / "dense"), "--out", str(tmp_path / "out"),
                "--rank-ratio", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reload identical: True" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()


TEXT = ("the cat sat on the mat and the dog ate the hat . a small bird sang in the old tree while the sun rose . "
        "we read the book by the river , then walked home through the quiet green park . ") * 30


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama with a matching fast BPE tokenizer saved in one folder, and a text file: (folder, text)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tiny-lm")
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=96, special_tokens=["<pad>", "<unk>", "</s>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>",
                                               eos_token="</s>", bos_token="</s>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root / "model", root / "text.txt"


def test_tt_vocab_prune_example(tiny_lm: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = tiny_lm
    text = tmp_path / "domain.txt"
    text.write_text("the cat sat on the mat . the dog sat in the park .")
    proc = _run("tt_vocab_prune.py", "--model", str(model), "--text", str(text), "--compression", "2",
                "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "reload identical: True" in proc.stdout
    v_old, v_new = map(int, re.search(r"vocabulary (\d+) -> (\d+) tokens", proc.stdout).groups())
    assert v_new < v_old
    import json

    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == v_new


def test_jlcm_3bit_example(tiny_lm: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = tiny_lm
    proc = _run("jlcm_3bit.py", "--model", str(model), "--text", str(text), "--steps", "3", "--n-samples", "4",
                "--seq-len", "32", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "reload identical: True" in proc.stdout
    bits = float(re.search(r"at ([\d.]+) index bits/weight", proc.stdout).group(1))
    assert 3.0 <= bits < 3.01  # packed 3-bit codes (byte padding only)
    ratio = float(re.search(r"dense parameter bytes \(([\d.]+)\)", proc.stdout).group(1))
    assert ratio < 1.0


def test_jlcm_3bit_example_finetune(tiny_lm: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = tiny_lm
    proc = _run("jlcm_3bit.py", "--model", str(model), "--text", str(text), "--steps", "3", "--n-samples", "4",
                "--seq-len", "32", "--finetune-seconds", "3", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "reload identical: True" in proc.stdout and re.search(r"for [1-9]\d* steps", proc.stdout)
    bits = float(re.search(r"at ([\d.]+) index bits/weight", proc.stdout).group(1))
    assert 3.0 <= bits < 3.01  # still the packed 3-bit codes


def test_subspace_distill_example(tiny_lm: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = tiny_lm
    proc = _run("subspace_distill.py", "--model", str(model), "--text", str(text), "--steps", "16", "--n-samples",
                "8", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "reload identical: True" in proc.stdout
    before, after = map(float, re.search(r"distillation loss \(\w+\): ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert after < before


def test_finetune_peft_example(tiny_lm: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = tiny_lm
    proc = _run("finetune_peft.py", "--model", str(model), "--text", str(text), "--steps", "10", "--seq-len", "32",
                "--lr", "1e-2", "--max-examples", "16", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "adapter reload matches: True" in proc.stdout
    assert re.search(r"merged model .* reload matches: True", proc.stdout)  # the merged model's own check
    before, after = map(float, re.search(r"held-out loss: ([\d.]+) before, ([\d.]+) after", proc.stdout).groups())
    assert after < before
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
