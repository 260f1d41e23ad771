"""Weights in tiles of 16 rows for the native loop's int8-activation kernels on AVX512-VNNI
(``LB_Q4C`` / ``LB_I8C`` / ``LB_L4C`` in ``csrc/lowbit_native.h``, kernels in
``csrc/q8_tiles.c``).

In a tile, one 64-byte load holds 4 consecutive inputs of each of 16 rows (a dword per row),
so one ``vpdpbusd`` against 4 broadcast activation codes advances 16 rows at once and the
16 sums leave the kernel as one vector, with no reduction across lanes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _per_block_tiles(t: torch.Tensor, n16: int, blocks: int) -> torch.Tensor:
    """``[n, G]`` values per row and block of 32 -> ``[n16 / 16, G, 16]``, rows padded with 0."""
    t = F.pad(t, (0, blocks - t.shape[1], 0, n16 - t.shape[0]))
    return t.reshape(n16 // 16, 16, blocks).transpose(1, 2).contiguous()


def _nibble_tiles(u: torch.Tensor, n16: int, blocks: int, pad: int) -> torch.Tensor:
    """4-bit codes ``[n, k]`` -> ``[n16 / 16, G, step, row, byte]`` (``LB_Q4C``), padded
    with ``pad``: per block, inputs 0-15 in the low nibbles, 16-31 in the high ones."""
    n, k = u.shape
    u = F.pad(u.to(torch.int16), (0, 32 * blocks - k, 0, n16 - n), value=pad).to(torch.uint8)
    u = u.view(n16, blocks, 2, 16)
    packed = (u[:, :, 0] | (u[:, :, 1] << 4)).view(n16 // 16, 16, blocks, 4, 4)
    return packed.permute(0, 2, 3, 1, 4).contiguous()


def lookup_tiles(state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """A ``dequant`` state of a 4-bit lookup format as ``LB_L4C``: ``(codes, table, s, G)``,
    or None unless its one table holds integers in [-128, 127] and its scales are float16
    per 32 inputs (IQ4_NL): the table stored + 128 as bytes, the scales as float16 (exact)."""
    qparams = state.qparams
    fmt, gran = qparams.format, qparams.granularity
    if (fmt.kind != "lookup" or fmt.bits > 4 or gran.kind != "group" or gran.group_size != 32
            or qparams.zero_point is not None):
        return None
    values = torch.tensor(fmt.values, dtype=torch.float64)
    scales = qparams.scale.float()
    if (values.round() != values).any() or values.min() < -128 or values.max() > 127 or \
            not torch.equal(scales.half().float(), scales):
        return None
    codes = state.codes()
    n, k = codes.shape
    blocks, n16 = -(-k // 32), -(-n // 16) * 16
    table = F.pad(values + 128, (0, 16 - len(values)), value=128).to(torch.uint8)
    s = _per_block_tiles(scales.reshape(n, -1), n16, blocks).half()
    return _nibble_tiles(codes, n16, blocks, pad=0), table, s, blocks


def q4c(kernel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """An ``int4_weight`` state as ``LB_Q4C``: ``(codes, s, z, G)``, the same codes and its
    kernel's bf16 scales and zeros (the numbers the Python runtime multiplies) repeated per
    32 inputs; padding rows and inputs hold code 8 with scale 0. ``z`` is None when zero."""
    from lowbit.kernels.int4_weight import unpack_int4_codes

    n, k = kernel.out_features, kernel.in_features
    blocks, n16 = -(-k // 32), -(-n // 16) * 16
    u = unpack_int4_codes(kernel).to(torch.int16) + (8 if kernel.signed else 0)
    codes = _nibble_tiles(u, n16, blocks, pad=8)
    sz = kernel.scales_and_zeros[:, :n].repeat_interleave(kernel.kernel_group_size // 32, 0)
    s, z = (_per_block_tiles(sz[:blocks, :, i].T, n16, blocks) for i in (0, 1))
    return codes, s, (None if not z.any() else z), blocks


def i8c(codes: torch.Tensor, scales: torch.Tensor, per_block: bool
        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int8 ``codes [n, k]`` as ``LB_I8C``: ``(tiles, s, G)``, each code stored + 128 (inputs
    padded with 0); ``scales`` float ``[n, k / 32]`` per block (``per_block``, Q8_0) or
    ``[n]`` per row."""
    n, k = codes.shape
    blocks, n16 = -(-k // 32), -(-n // 16) * 16
    w = F.pad(codes.to(torch.int16), (0, 32 * blocks - k, 0, n16 - n)) + 128
    tiles = w.to(torch.uint8).view(n16 // 16, 16, blocks, 8, 4).permute(0, 2, 3, 1, 4)
    if per_block:
        s = _per_block_tiles(scales.float().reshape(n, -1), n16, blocks)
    else:
        s = F.pad(scales.float().reshape(n), (0, n16 - n)).contiguous()
    return tiles.contiguous(), s, blocks
