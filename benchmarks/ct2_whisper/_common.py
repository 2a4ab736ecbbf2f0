"""Names shared by the :mod:`benchmarks.ct2_whisper` modules: error prefix, cache root, folder marker."""

from __future__ import annotations

import os
from pathlib import Path

_MOD = "benchmarks.ct2_whisper"
COMPLETE = ".hf_compress-complete"  # marker written last into a finished folder
SAMPLE_RATE = 16_000
_MAX_TARGET_POSITIONS = 448  # Whisper decoder positions (every released size)


def default_cache_root() -> Path:
    """``$HF_COMPRESS_CACHE`` or ``~/.cache/hf_compress``."""
    return Path(os.environ.get("HF_COMPRESS_CACHE") or Path.home() / ".cache" / "hf_compress")


def _relax_permissions(folder: Path) -> None:
    """mkdtemp folders (and some writers' files) are private; give them the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for entry in folder.rglob("*"):
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)
