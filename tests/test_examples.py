"""Every script in examples/ runs on a tiny model (subprocess, as a user runs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ARCHS, tiny_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          check=False, timeout=300)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in ("llama", "gpt2")], ids=lambda a: a.name)
def test_compress_and_push_example(arch, tmp_path: Path) -> None:
    tiny_model(arch).save_pretrained(tmp_path / "dense")
    proc = _run("compress_and_push.py", str(tmp_path / "dense"), "--out", str(tmp_path / "out"),
                "--rank-ratio", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reload identical: True" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()
