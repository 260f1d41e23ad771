"""The weight of a 4-bit lookup layer (NF4 / log4 / codebook(values) with per-group scales;
per-row k-means codebooks) for a many-row GEMM, widened in C (``lowbit_lut4_dequant`` in
``csrc/lut_gemv.c``) instead of torch's unpack, index and multiply on every call.

The numbers are the torch path's exactly (``PackedWeight.dequantize`` and
``codebook.gather_rows``: each weight one float32 product, then cast), which stays the
reference and runs wherever this one does not.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from lowbit.kernels import native

_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def _call():
    fn = native.library().lowbit_lut4_dequant
    fn.argtypes = [_P, _I, _I, _I, _P, _I, _P, _I, _I, _P]
    fn.restype = None
    return fn


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
    _call()(qdata.contiguous().data_ptr(), n, k, qdata.shape[1], table.data_ptr(), int(per_row),
            None if scales is None else scales.data_ptr(), group, int(dtype == torch.bfloat16),
            out.data_ptr())
    return out


def usable(bits: int, kind: str, zero_point, dtype: torch.dtype) -> bool:
    """Whether ``lookup_weight`` takes a layer: 4-bit codes, group or channel tables or
    scales, no zero-point, a float32 or bfloat16 product, and the native library here."""
    return (bits == 4 and kind in ("group", "channel") and zero_point is None
            and dtype in (torch.float32, torch.bfloat16) and native.available()
            and not torch.compiler.is_compiling())
