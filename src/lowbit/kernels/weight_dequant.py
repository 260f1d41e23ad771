"""Weights that ``DequantBackend`` and ``CodebookBackend`` widen on every call, widened in
C instead of torch's unpack, index and multiply: 4-bit lookup layers (NF4 / log4 /
codebook(values) with per-group scales; per-row k-means codebooks: ``lowbit_lut4_dequant``
in ``csrc/lut_gemv.c``) and symmetric int8 codes with group or channel scales (the Q8_0 head
of the gguf recipes: ``lowbit_int8_dequant`` in ``csrc/weight_dequant.c``).

The numbers are the torch path's exactly (``PackedWeight.dequantize`` and
``codebook.gather_rows``: each weight one float32 product, then cast), which stays the
reference and runs wherever these do not.
"""

from __future__ import annotations

import ctypes

import torch

from lowbit.kernels import native

_P, _I = ctypes.c_void_p, ctypes.c_int64


def _fn(name: str, argtypes: list):
    """The library's ``name`` with its argument types set: bound on the library loaded now
    (``native.reset`` may load another, whose functions start without them)."""
    fn = getattr(native.library(), name)
    if fn.argtypes is None:
        fn.argtypes, fn.restype = argtypes, None
    return fn


def int8_weight(codes: torch.Tensor, in_features: int, scales: torch.Tensor, group: int,
                dtype: torch.dtype) -> torch.Tensor:
    """``[N, K]`` weight ``codes[n, k] * scales[n, k // group]`` in ``dtype`` (float32 or
    bfloat16) of int8 ``codes`` ``[N, >= K]``."""
    codes = codes.contiguous()
    n, k = codes.shape[0], in_features
    scales = scales.float().contiguous()
    out = torch.empty(n, k, dtype=dtype)
    _fn("lowbit_int8_dequant", [_P, _I, _I, _I, _P, _I, _I, _P])(
        codes.data_ptr(), n, k, codes.shape[1], scales.data_ptr(), group,
        int(dtype == torch.bfloat16), out.data_ptr())
    return out


def lookup_weight(qdata: torch.Tensor, in_features: int, table: torch.Tensor,
                  scales: torch.Tensor | None, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, K]`` weight in ``dtype`` (float32 or bfloat16): ``table[u] * scales[n, k // group]``
    for a shared ``table`` ``[16]``, or ``table[n, k // group, u]`` for per-row tables
    ``[N, G, 16]`` (``scales`` None); ``qdata`` uint8 ``[N, ceil(K / 2)]`` in lowbit's 4-bit
    packing."""
    n, k = qdata.shape[0], in_features
    per_row = table.dim() == 3
    table = table.float().contiguous()
    scales = None if scales is None else scales.float().contiguous()
    out = torch.empty(n, k, dtype=dtype)
    _fn("lowbit_lut4_dequant", [_P, _I, _I, _I, _P, _I, _P, _I, _I, _P])(
        qdata.contiguous().data_ptr(), n, k, qdata.shape[1], table.data_ptr(), int(per_row),
            None if scales is None else scales.data_ptr(), group, int(dtype == torch.bfloat16),
            out.data_ptr())
    return out


def usable(kind: str, zero_point, dtype: torch.dtype) -> bool:
    """Whether a layer whose codes one of the functions above takes (the caller checks the
    format: 4-bit lookup, int8) widens here: group or channel tables or scales, no
    zero-point, a float32 or bfloat16 product, and the native library here."""
    return (kind in ("group", "channel") and zero_point is None
            and dtype in (torch.float32, torch.bfloat16) and native.available()
            and not torch.compiler.is_compiling())
