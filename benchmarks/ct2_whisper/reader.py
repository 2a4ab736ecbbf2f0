"""Reading CTranslate2 files: the ``model.bin`` binary format (version 6), name aliases, int8/int16 dequantization
and the token table of ``tokenizer.json`` / ``vocabulary.*``."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ._common import _MOD

# Type ids of ctranslate2/specs/model_spec.py::_dtype_to_type_id (binary format version 6).
_CT2_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16,
                                        torch.bfloat16)
_CT2_BINARY_VERSION = 6


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
