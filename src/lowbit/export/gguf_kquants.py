"""llama.cpp's k-quant blocks (256 values each) holding lowbit codes solved on a super-block
scale grid (``formats.superblock``: a group's scale is ``d * sc``, its min ``dmin * m``).

Layouts (``ggml-common.h``; ``quantize_row_q*_K_ref`` in ``ggml-quants.c`` writes them and
``gguf.quants`` reads them; fp16 little-endian; ``L`` the 256 stored codes of a block):

- ``Q4_K`` (144 B): ``d | dmin | scales[12] | qs[128]``; 8 groups of 32, x = d sc q - dmin m.
  ``scales`` packs the eight 6-bit ``sc`` and ``m`` (``get_scale_min_k4``): bytes 0-3 hold
  sc0-3 with the top 2 bits of sc4-7 in bits 6-7, bytes 4-7 the same for the mins, bytes
  8-11 the low nibbles of sc4-7 (low) and m4-7 (high). ``qs``: per 64 values, byte l holds
  ``L[l]`` (low nibble) and ``L[l + 32]`` (high).
- ``Q5_K`` (176 B): ``d | dmin | scales[12] | qh[32] | qs[128]``: as Q4_K with bit 4 of
  ``L[64c + l]`` / ``L[64c + 32 + l]`` in bit ``2c`` / ``2c + 1`` of ``qh[l]``.
- ``Q6_K`` (210 B): ``ql[128] | qh[64] | int8 scales[16] | d``; 16 groups of 16, x = d sc
  (q - 32). Per 128 values: ``ql[l]`` = ``L[l]`` | ``L[l + 64] << 4``, ``ql[l + 32]`` =
  ``L[l + 32]`` | ``L[l + 96] << 4``, ``qh[l]`` the top 2 bits of ``L[l + 32 i]`` at ``2 i``.
- ``Q3_K`` (110 B): ``hmask[32] | qs[64] | scales[12] | d``; x = d (sc - 32) (q - 4) with
  6-bit ``sc``: low nibbles of sc0-7 / sc8-15 in bytes 0-7 (low / high), top 2 bits of
  ``sc[4k + i]`` at bits ``2k`` of byte ``8 + i``. Bit 2 of ``L[32k + l]`` is bit k of
  ``hmask[l]``; the low 2 bits go to ``qs``: per 128 values byte l holds ``L[l + 32 i]`` at ``2 i``.
- ``Q2_K`` (84 B): ``scales[16] | qs[64] | d | dmin``; ``scales[j]`` = ``sc_j | m_j << 4``,
  x = d sc q - dmin m; ``qs`` as Q3_K's.

``carry`` recovers ``d``, ``sc`` (``dmin``, ``m``) from a layer's stored scales and
zero-points (``superblock.split``) and packs its codes.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.formats.superblock import QK_K, split, super_scale
from lowbit.nn import WeightSpec

#: type -> (format, scale dtype, group size, bytes per block of 256)
KQUANTS = {"q6_k": ("int6", "fp16*i8", 16, 210), "q5_k": ("uint5", "fp16*u6", 32, 176),
           "q4_k": ("uint4", "fp16*u6", 32, 144), "q3_k": ("int3", "fp16*i6", 16, 110),
           "q2_k": ("uint2", "fp16*u4", 16, 84)}
#: added to a signed code to store it
OFFSET = {"q6_k": 32, "q3_k": 4}
#: relative error of a min rebuilt as ``zero_point * scale`` (float32 zero-point: 2^-24)
MIN_RTOL = 2.0**-20


def kquant_of(spec: WeightSpec) -> str | None:
    """The k-quant type whose grid ``spec`` is, or None."""
    key = (spec.format, spec.scale_dtype, spec.group_size)
    return next((k for k, v in KQUANTS.items() if v[:3] == key), None)


def _half(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(np.float16)
                                .reshape(-1, 1)).view(np.uint8)


def _bits(parts: np.ndarray, width: int, axis: int) -> np.ndarray:
    """OR of ``parts`` shifted by ``width * i`` along ``axis`` (i its index there), as uint8."""
    shifts = (np.arange(parts.shape[axis]) * width).astype(np.uint8)
    shape = [1] * parts.ndim
    shape[axis] = -1
    return np.bitwise_or.reduce(parts << shifts.reshape(shape), axis=axis).astype(np.uint8)


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins ``[n, 8]`` -> ``[n, 12]`` (inverse of get_scale_min_k4)."""
    lo, hi = slice(0, 4), slice(4, 8)
    return np.concatenate([sc[:, lo] | ((sc[:, hi] >> 4) << 6), m[:, lo] | ((m[:, hi] >> 4) << 6),
                           (sc[:, hi] & 0xF) | ((m[:, hi] & 0xF) << 4)], axis=1)


def _two_bit(L: np.ndarray) -> np.ndarray:
    """``[n, 256]`` 2-bit values -> ``[n, 64]``: per 128, byte l holds ``L[l + 32 i]`` at 2i."""
    return _bits(L.reshape(-1, 2, 4, 32) & 3, 2, 2).reshape(-1, 64)


def pack(name: str, L: np.ndarray, d: np.ndarray, sc: np.ndarray,
         dmin: np.ndarray | None = None, m: np.ndarray | None = None) -> np.ndarray:
    """Blocks of k-quant ``name`` for stored codes ``L [n, 256]`` (uint8, offset included),
    ``d [n]`` (float16-exact), integer ``sc [n, groups]`` (signed for Q6_K/Q3_K) and, for
    Q4_K/Q5_K/Q2_K, ``dmin [n]`` and ``m [n, groups]``. Returns uint8 ``[n, bytes]``."""
    L = np.ascontiguousarray(L, dtype=np.uint8)
    if name in ("q4_k", "q5_k"):
        L4 = L.reshape(-1, 4, 2, 32)
        parts = [_half(d), _half(dmin), _scales_k4(sc.astype(np.uint8), m.astype(np.uint8))]
        if name == "q5_k":
            parts.append(_bits(((L4 >> 4) & 1).reshape(-1, 8, 32), 1, 1))  # bit 2c + h
        parts.append(((L4[:, :, 0] & 0xF) | ((L4[:, :, 1] & 0xF) << 4)).reshape(-1, 128))
    elif name == "q6_k":
        L6 = L.reshape(-1, 2, 4, 32)
        ql = np.concatenate([(L6[:, :, 0] & 0xF) | ((L6[:, :, 2] & 0xF) << 4),
                             (L6[:, :, 1] & 0xF) | ((L6[:, :, 3] & 0xF) << 4)], axis=2)
        parts = [ql.reshape(-1, 128), _bits(L6 >> 4, 2, 2).reshape(-1, 64),
                 sc.astype(np.int8).view(np.uint8), _half(d)]
    elif name == "q3_k":
        biased = (sc.astype(np.int16) + 32).astype(np.uint8)  # 6 bits
        low = (biased[:, :8] & 0xF) | ((biased[:, 8:] & 0xF) << 4)
        high = _bits((biased >> 4).reshape(-1, 4, 4), 2, 1)
        parts = [_bits(((L >> 2) & 1).reshape(-1, 8, 32), 1, 1), _two_bit(L), low, high,
                 _half(d)]
    elif name == "q2_k":
        scales = sc.astype(np.uint8) | (m.astype(np.uint8) << 4)
        parts = [scales, _two_bit(L), _half(d), _half(dmin)]
    else:
        raise ValueError(f"{name} is not a k-quant; use one of {', '.join(KQUANTS)}")
    return np.concatenate(parts, axis=1)


def super_parameters(name: str, scale: torch.Tensor, zero_point: torch.Tensor | None):
    """``(d, sc, dmin, m)`` per super-block from a layer's group scales and float
    zero-points ``[rows, groups]`` (``superblock.split``; ``dmin``/``m`` None when
    symmetric); ``FormatError`` when they are on no k-quant grid."""
    _, scale_dtype, group, _ = KQUANTS[name]
    kind = super_scale(scale_dtype)
    per = QK_K // group
    s = scale.detach().double().reshape(-1, per)
    d, sc = split(s, kind.levels, kind.negative)
    if zero_point is None:
        return d.numpy(), sc.numpy(), None, None
    offset = (zero_point.detach().double().reshape(-1, per) * s).clamp_min(0)
    dmin, m = split(offset, kind.min_levels, False, MIN_RTOL)
    return d.numpy(), sc.numpy(), dmin.numpy(), m.numpy()


def carry(name: str, codes: torch.Tensor, scale: torch.Tensor,
          zero_point: torch.Tensor | None) -> np.ndarray:
    """uint8 ``[rows, cols / 256 * bytes]`` k-quant blocks of lowbit ``codes [rows, cols]``
    with their group parameters (``cols`` a multiple of 256)."""
    rows, cols = codes.shape
    stored = codes.to(torch.int16) + OFFSET.get(name, 0)
    d, sc, dmin, m = super_parameters(name, scale, zero_point)
    blocks = pack(name, stored.numpy().astype(np.uint8).reshape(-1, QK_K), d, sc, dmin, m)
    return blocks.reshape(rows, -1)
