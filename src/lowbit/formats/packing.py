"""Sub-byte packing: unsigned ``bits``-wide patterns (1-8 bits) packed densely into bytes.

Packing runs along the last axis. ``n`` values of ``bits`` bits take ``ceil(n * bits / 8)``
bytes per row (N int4 values take N/2 bytes). Layout, little-endian within a byte:
- 1, 2, 4 and 8 bits: value ``i`` of a byte sits at bit offset ``(i * bits) % 8``;
- 3, 5, 6 and 7 bits: the row is cut into chunks of 8 values; a chunk's ``8 * bits`` bits
  are laid out as one little-endian bit stream over ``bits`` bytes.
"""

from __future__ import annotations

import math

import torch

from lowbit.formats.base import FormatError

_DIVISORS = (1, 2, 4, 8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise FormatError(f"packing supports 1 to 8 bits, got {bits!r}")


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` values of ``bits`` bits take after packing (one row)."""
    _check_bits(bits)
    if bits in _DIVISORS:
        return math.ceil(n * bits / 8)
    return math.ceil(n / 8) * bits


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned patterns (any integer dtype, each in ``[0, 2**bits)``) into uint8."""
    _check_bits(bits)
    if values.is_floating_point():
        raise FormatError("pack takes integer bit patterns; call fmt.to_bits(codes) first")
    v = values.to(torch.uint8)
    if bits == 8:
        return v.contiguous()
    per_chunk = 8 // bits if bits in _DIVISORS else 8
    pad = (-v.shape[-1]) % per_chunk
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    if bits in _DIVISORS:
        v = v.reshape(*v.shape[:-1], -1, per_chunk)
        out = v[..., 0].clone()
        for i in range(1, per_chunk):
            out |= v[..., i] << (i * bits)
        return out
    # generic bit stream: (..., chunks, 8 values, bits) -> (..., chunks, bits bytes, 8 bits)
    v = v.reshape(*v.shape[:-1], -1, 8)
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=v.device)
    stream = ((v.unsqueeze(-1) >> bit_idx) & 1).reshape(*v.shape[:-1], bits, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=v.device))
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8).flatten(-2)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``n`` patterns of each row, as uint8."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise FormatError(f"unpack takes uint8 bytes, got {packed.dtype}")
    if packed.shape[-1] != packed_size(n, bits):
        raise FormatError(
            f"{packed.shape[-1]} bytes per row cannot hold {n} values of {bits} bits "
            f"(expected {packed_size(n, bits)})"
        )
    if bits == 8:
        return packed
    if bits in _DIVISORS:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
        out = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return out.flatten(-2)[..., :n]
    chunks = packed.reshape(*packed.shape[:-1], -1, bits)
    bit_idx = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((chunks.unsqueeze(-1) >> bit_idx) & 1).reshape(*chunks.shape[:-1], 8, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device))
    values = (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return values.flatten(-2)[..., :n]
