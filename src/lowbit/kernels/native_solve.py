"""GPTQ's and the refinement's column loops in C (``csrc/solve_ops.c``), for integer formats.

Both loops visit a block's columns one at a time, and in torch each column is a dozen small
calls (quantize, error, a rank-1 update of the block): about 60 us per column, 167,000
columns per pass over SmolLM2-135M's decoder. Every row evolves on its own given the
block's slice of ``H^-1`` (or ``H``), so the C loop runs one row's whole block at a time,
rows in parallel. The loops are plain C, built as their own library without x86 flags
(``native.solve_library``), so they run wherever a C compiler does. The torch loops in
``algorithms/gptq_columns.py`` and ``algorithms/refine.py`` stay the reference
(``native=False``); ``tests/algorithms/test_native_solve.py`` compares.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from lowbit.kernels import native

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


@functools.cache
def _lib():
    lib = native.solve_library()
    if lib is None:
        raise RuntimeError(f"lowbit's C column loops are unavailable: "
                           f"{native.why_unavailable(solve=True)}")
    lib.lowbit_gptq_columns.argtypes = [_P, _P, _I, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P,
                                        _F, _F, _P, _P, _I]
    lib.lowbit_gptq_columns.restype = None
    lib.lowbit_cd_columns.argtypes = [_P, _P, _I, _I, _I, _P, _I, _P, _P, _P, _P, _F, _F, _P,
                                      _P, _I]
    lib.lowbit_cd_columns.restype = ctypes.c_int64
    return lib


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the C loops can run on these (float32, CPU) tensors here."""
    return native.solve_library() is not None and all(
        t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


class GroupTable:
    """Per-group float32 scale (and zero-point) vectors of one weight, ``[groups, rows]``,
    filled as groups become known; the C loops read ``scale[g, r]``."""

    def __init__(self, n_groups: int, rows: int, zero: bool):
        self.scale = torch.ones(n_groups, rows)
        self.zero = torch.zeros(n_groups, rows) if zero else None

    def set(self, g: int, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        self.scale[g] = scale
        if self.zero is not None:
            self.zero[g] = zero


def _addr(t: torch.Tensor, offset: int = 0) -> int:
    """Address of element ``offset`` (row-major) of a contiguous float32 tensor."""
    if not (t.is_contiguous() and t.dtype == torch.float32):
        raise ValueError("the C loops take contiguous float32 tensors")
    return t.data_ptr() + 4 * offset


def gptq_columns(W1: torch.Tensor, Err1: torch.Tensor, c0: int, c1: int, Hinv: torch.Tensor,
                 i1: int, d: torch.Tensor, group: torch.Tensor, table: GroupTable, lo: float,
                 hi: float, codes: torch.Tensor, losses: torch.Tensor) -> None:
    """Columns ``[c0, c1)`` of the block starting at column ``i1`` (``W1``, ``Err1``
    contiguous ``[rows, width]``, ``Hinv`` the full ``[cols, cols]`` factor, ``d`` and
    ``group`` the block's diagonal and group indices): GPTQ's inner loop, in place."""
    rows, width = W1.shape
    cols = Hinv.shape[1]
    _lib().lowbit_gptq_columns(
        _addr(W1), _addr(Err1), rows, width, width, c0, c1,
        _addr(Hinv, i1 * cols + i1), cols, _addr(d), group.data_ptr(),
        table.scale.data_ptr(), native._ptr(table.zero), lo, hi, _addr(codes, i1),
        _addr(losses, i1), codes.shape[1])


def cd_columns(Gb: torch.Tensor, dE: torch.Tensor, H: torch.Tensor, i1: int, d: torch.Tensor,
               group: torch.Tensor, table: GroupTable, lo: float, hi: float,
               codes: torch.Tensor, values: torch.Tensor) -> int:
    """One block of a coordinate-descent sweep (``refine.coordinate_descent``) starting at
    column ``i1``: updates ``Gb``, ``dE``, ``codes`` and ``values`` (float32) in place;
    returns how many codes changed."""
    rows, width = Gb.shape
    cols = H.shape[1]
    return int(_lib().lowbit_cd_columns(
        _addr(Gb), _addr(dE), rows, width, width, _addr(H, i1 * cols + i1), cols,
        _addr(d), group.data_ptr(), table.scale.data_ptr(), native._ptr(table.zero), lo,
        hi, _addr(codes, i1), _addr(values, i1), codes.shape[1]))
