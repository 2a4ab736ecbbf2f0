"""Vectorized bit packing of unsigned integers into ``uint8`` bytes (any width 1..31 bits: codes up to 16, row
indices of tables with more than 65,536 rows up to 31).

Value ``i`` occupies bits ``[i·bits, (i+1)·bits)`` of the little-endian bit stream (least significant bit
first), so ``n`` values take exactly ``ceil(n·bits / 8)`` bytes. Both directions are pure torch, no Python loop
over values.
"""

from __future__ import annotations

import math

import torch

_BYTE_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)  # [8]: bit j of a byte is worth 2**j


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 31:  # (int32 arithmetic below)
        raise ValueError(f"hf_compress: bit width must be an int in 1..31, got {bits!r}.")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by ``n`` values of ``bits`` bits each: ``ceil(n·bits / 8)``."""
    _check_bits(bits)
    return math.ceil(n * bits / 8)


_CHUNK = 1 << 22  # values packed / unpacked at a time (a multiple of 8: each whole chunk fills whole bytes)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``values`` (any shape, each in ``[0, 2**bits)``) into ``uint8 [ceil(numel·bits/8)]``.

    Raises a ``ValueError`` for out-of-range values or widths outside 1..31.
    """
    _check_bits(bits)
    if values.is_floating_point() or values.is_complex():
        raise TypeError(f"hf_compress: pack_bits needs an integer tensor, got {values.dtype}.")
    flat = values.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):  # checked before narrowing
        raise ValueError(
            f"hf_compress: pack_bits: values must lie in [0, {1 << bits}) for {bits} bits; got range "
            f"[{int(flat.min())}, {int(flat.max())}]."
        )
    if flat.numel() <= _CHUNK:
        return _pack(flat, bits)
    # bounded memory: whole chunks of 8·k values pack to whole bytes, concatenated
    return torch.cat([_pack(flat[i:i + _CHUNK], bits) for i in range(0, flat.numel(), _CHUNK)])


def _pack(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer ``[n]`` values, already checked, → ``uint8 [ceil(n·bits/8)]``."""
    flat = flat.to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)  # [n·bits] bits, LSB first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = _BYTE_WEIGHTS.to(flat.device)
    return (stream.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values (``[n]``, ``dtype``) of ``packed`` (``uint8``)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"hf_compress: unpack_bits needs a uint8 tensor, got {packed.dtype}.")
    need = packed_nbytes(n, bits)
    if packed.numel() < need:
        raise ValueError(
            f"hf_compress: unpack_bits: {n} values of {bits} bits need {need} bytes, got {packed.numel()}."
        )
    if n <= _CHUNK:
        return _unpack(packed, bits, n, dtype)
    # bounded memory: chunk i's values start at byte i·bits/8 (chunks are multiples of 8 values), concatenated
    return torch.cat([_unpack(packed[i * bits // 8:], bits, min(_CHUNK, n - i), dtype) for i in range(0, n, _CHUNK)])


def _unpack(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``n`` values of ``packed`` (``uint8``, already checked to hold them) → ``[n]`` ``dtype``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:packed_nbytes(n, bits), None] >> shifts) & 1).reshape(-1)[: n * bits]  # [n·bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device))
    return (stream.reshape(n, bits).to(torch.int32) * weights).sum(1).to(dtype)
