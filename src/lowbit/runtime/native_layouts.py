"""The native decode loop's row-major weight layouts (``csrc/lowbit_native.h``), built once
from a layer's packed state: ``LB_Q4R`` (4-bit codes, rows in groups of four, for the int8
kernels without VNNI), ``LB_LUT4`` (lookup formats on float activations) and ``LB_LUT4Q``
(their int16 tables for int8 activations). The tiles of 16 rows are ``native_tiles``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class Unsupported(Exception):
    """A layer the native loop has no layout for (the message says which and why)."""


def q4r(kernel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An ``int4_weight`` state's codes in ``LB_Q4R``'s order (lowbit_native.h): rows in
    groups of four, per row and 64 inputs 32 bytes, byte ``j`` holding inputs ``j`` (low
    nibble) and ``j + 32``; its kernel's bf16 scales and zeros repeated per 32 inputs (exact:
    the same bf16 numbers), 16 blocks of a row together. Padding: code 8, scale 0."""
    from lowbit.kernels.int4_weight import unpack_int4_codes

    n, k = kernel.out_features, kernel.in_features
    kp, n4 = -(-k // 64) * 64, -(-n // 4) * 4
    u = unpack_int4_codes(kernel).to(torch.int16) + (8 if kernel.signed else 0)
    u = F.pad(u, (0, kp - k, 0, n4 - n), value=8).to(torch.uint8).view(n4, kp // 64, 2, 32)
    codes = (u[:, :, 0] | (u[:, :, 1] << 4)).view(n4 // 4, 4, kp // 64, 32)
    codes = codes.transpose(1, 2).reshape(n4, kp // 2).contiguous()
    g16 = -(-kp // 512) * 16  # blocks of 32 per row, padded to whole loads of 16
    sz = kernel.scales_and_zeros[:, :n].repeat_interleave(kernel.kernel_group_size // 32, 0)
    sz = F.pad(sz[: kp // 32], (0, 0, 0, n4 - n, 0, g16 - min(sz.shape[0], kp // 32)))

    def grouped(t: torch.Tensor) -> torch.Tensor:  # [g16, n4] -> [n4 / 4, g16 / 16, 4, 16]
        return t.T.reshape(n4 // 4, 4, g16 // 16, 16).transpose(1, 2).contiguous()

    s, z = grouped(sz[..., 0]), grouped(sz[..., 1])
    return codes, s, (None if not z.any() else z)


def lut4(module, name: str, state) -> tuple | None:
    """``LB_LUT4``'s codes, tables, scales, group size and table mode for a lookup format of
    at most 4 bits (NF4, log4, codebook(values): one table, scales per group; per-row
    k-means codebooks: a table per row and group), or None when the layer is neither."""
    qp = state.qparams
    fmt, gran, n, k = qp.format, qp.granularity, module.out_features, module.in_features
    if fmt.kind != "lookup" or fmt.bits > 4 or name not in ("dequant", "codebook"):
        return None
    kp = -(-k // 32) * 32
    kg = gran.group_size if gran.kind == "group" else kp
    if gran.kind not in ("group", "channel") or kg % 32 or qp.zero_point is not None:
        raise Unsupported(f"{fmt.name} {gran}: the lookup kernel takes groups of a multiple "
                          "of 32 inputs or whole rows, without zero-points")
    u = (state.codes() if name == "dequant" else codebook_indices(state)).to(torch.uint8)
    u = F.pad(u, (0, kp - k)).view(n, kp // 32, 2, 16)
    codes = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()
    if name == "codebook":  # centroids [n, (groups,) levels]: a table per row and group
        table = qp.scale.float().reshape(n, -1, qp.scale.shape[-1])
        table = F.pad(table, (0, 16 - table.shape[-1])).contiguous()
        return codes, table, None, kg, 1
    table = F.pad(torch.tensor(fmt.values, dtype=torch.float32), (0, 16 - len(fmt.values)))
    return codes, table, qp.scale.float().reshape(n, -1).contiguous(), kg, 0


def lut4q(table: torch.Tensor, scales: torch.Tensor | None, n: int, groups: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``LB_LUT4Q``'s tables and scales from ``LB_LUT4``'s: each table of 16 values as int16
    ``T16 = round(T / max|T| * 32767)`` in two byte planes (``[tables, 32]``: low bytes, then
    high bytes), and per row and group the scale times that table's unit ``max|T| / 32767``.
    """
    t = table.reshape(-1, 16)
    top = t.abs().amax(1, keepdim=True)
    t16 = torch.where(top > 0, torch.round(t / top.clamp_min(1e-30) * 32767), 0).to(torch.int16)
    planes = torch.cat([t16 & 255, (t16 >> 8) & 255], 1).to(torch.uint8).contiguous()
    unit = (top[:, 0] / 32767).float()
    per_group = unit.view(n, groups) if t.shape[0] > 1 else unit.expand(n, groups)
    s = per_group * (scales.view(n, groups) if scales is not None else 1.0)
    return planes, s.contiguous()


def codebook_indices(state) -> torch.Tensor:
    from lowbit.formats import unpack

    return unpack(state.qdata, state.qparams.format.bits, state.in_features)
