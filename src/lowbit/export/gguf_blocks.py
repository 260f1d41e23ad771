"""GGUF block encodings of 32 values (little-endian fp16 ``d`` and ``m``), built from codes.

- ``Q8_0`` (34 B): ``d | int8 q[32]``, x = d * q;
- ``Q4_0`` (18 B): ``d | qs[16]``, x = d * (q - 8); byte j holds value j (low nibble) and
  value j + 16 (high nibble);
- ``Q4_1`` (20 B): ``d | m | qs[16]``, x = d * q + m;
- ``Q5_0`` (22 B) / ``Q5_1`` (24 B): as Q4_0 / Q4_1 with the fifth bit of value j in bit j
  of a little-endian 32-bit ``qh`` after ``d`` (and ``m``); x = d * (q - 16) / d * q + m;
- ``IQ4_NL`` (18 B): laid out as Q4_0, x = d * kvalues_iq4nl[q] (a 16-value non-linear table,
  ``formats.lookup.IQ4NL_VALUES``).

``pack`` lays codes out; ``round_float`` chooses codes for a float weight the way llama.cpp's
reference quantizers do (float32 arithmetic, same rounding), so ``pack(*round_float(w, t))``
is byte for byte what ``gguf.quants.quantize(w, t)`` gives (tests check it).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
#: type name -> (bits, has a min ``m``)
BLOCK_TYPES = {"q8_0": (8, False), "q4_0": (4, False), "q4_1": (4, True),
               "q5_0": (5, False), "q5_1": (5, True), "iq4_nl": (4, False)}
FLOAT_TYPES = ("f32", "f16")
#: the types ``round_float`` rounds as llama.cpp's reference quantizer does (gguf-py has no
#: IQ4_NL quantizer to check one against: ``gguf_weights.float_weight`` rounds that by lowbit)
REFERENCE_ROUNDED = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
#: offset added to a signed code to store it (x = d * (stored - offset))
OFFSET = {"q8_0": 0, "q4_0": 8, "q5_0": 16, "q4_1": 0, "q5_1": 0, "iq4_nl": 0}


def ggml_type(name: str):
    """The ``gguf.GGMLQuantizationType`` of ``name`` (``q8_0``, ``f16``...)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def block_bytes(name: str) -> int:
    bits, has_min = BLOCK_TYPES[name]
    return 2 + (2 if has_min else 0) + BLOCK * bits // 8


def _half(x: np.ndarray) -> np.ndarray:
    """``[n]`` float32 -> ``[n, 2]`` bytes of its float16 rounding (nearest-even)."""
    return np.ascontiguousarray(x.astype(np.float16).reshape(-1, 1)).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``[n, 32]`` codes -> ``[n, 16]`` bytes: value j low nibble, value j + 16 high."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """``[n, 32]`` 5-bit codes -> ``[n, 4]`` bytes: bit j of the 32-bit word is value j's bit 4."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def pack(name: str, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Blocks of ``name`` for stored codes ``[rows, cols]`` (uint8, offset included; int8 for
    Q8_0) with one ``d`` (and ``m``) per block ``[rows, cols // 32]`` (float32; rounded to
    float16 here). Returns uint8 ``[rows, cols // 32 * block_bytes]``."""
    rows, cols = codes.shape
    n = rows * (cols // BLOCK)
    q = np.ascontiguousarray(codes).reshape(n, BLOCK)
    parts = [_half(np.asarray(d, np.float32).reshape(n))]
    if BLOCK_TYPES[name][1]:
        parts.append(_half(np.asarray(m, np.float32).reshape(n)))
    if name == "q8_0":
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        q = q.astype(np.uint8)
        if name in ("q5_0", "q5_1"):
            parts.append(_high_bits(q))
        parts.append(_nibbles(q))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def _round_away(y: np.ndarray) -> np.ndarray:
    """C ``roundf``: halves away from zero, exact in float32 (no ``|y| + 0.5`` rounding)."""
    a = np.abs(y)
    f = np.floor(a)
    return np.copysign(f + (a - f >= np.float32(0.5)), y).astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def round_float(w: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes, ``d`` and ``m`` (float32, before their float16 rounding) that llama.cpp's
    reference quantizer picks for float weight ``w`` ``[rows, cols]``; ``cols % 32 == 0``."""
    if name not in REFERENCE_ROUNDED:
        raise ValueError(f"no reference rounding for {name}; use one of {REFERENCE_ROUNDED}")
    rows, cols = w.shape
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, BLOCK)
    bits, has_min = BLOCK_TYPES[name]
    m = None
    if name == "q8_0":
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
        q = _round_away(x * _inverse(d)).astype(np.int8)
    elif has_min:
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        top = (1 << bits) - 1
        d = (hi - lo) / np.float32(top)
        y = (x - lo) * _inverse(d) + np.float32(0.5)
        q = np.clip(np.trunc(y), 0, top).astype(np.uint8)
        m = lo.reshape(rows, -1)
    else:
        half = 1 << (bits - 1)
        idx = np.abs(x).argmax(axis=1)[:, None]  # first value of largest magnitude, signed
        d = np.take_along_axis(x, idx, axis=1) / np.float32(-half)
        y = x * _inverse(d) + np.float32(half + 0.5)
        q = np.clip(np.trunc(y), 0, 2 * half - 1).astype(np.uint8)
    return q.reshape(rows, cols), d.reshape(rows, -1).astype(np.float32), m


def dequantize(name: str, blocks: np.ndarray, cols: int) -> np.ndarray:
    """Float32 ``[rows, cols]`` values of ``blocks`` through ``gguf.quants`` (the oracle)."""
    from gguf.quants import dequantize as gguf_dequantize

    if name in FLOAT_TYPES:
        return np.asarray(blocks, np.float32).reshape(-1, cols)
    return gguf_dequantize(blocks, ggml_type(name)).reshape(-1, cols).astype(np.float32)
