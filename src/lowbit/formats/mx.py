"""OCP Microscaling (MX) formats, OCP MX Specification v1.0 (2023; Rouhani et al., 2023).

An MX block is ``block_size = 32`` consecutive elements along the last axis sharing one
8-bit E8M0 scale ``X = 2^(E - 127)`` (E = 255 is NaN). Elements are FP8 E4M3/E5M2, FP6
E3M2/E2M3, FP4 E2M1 or INT8 (two's complement with 6 fractional bits, values k/64). The
conversion of spec section 6.3: ``shared_exp = floor(log2(max|V|)) - emax_elem`` with
``emax_elem`` the exponent of the element format's largest normal, then each ``V_i / X`` is
rounded to the element format, to nearest even, saturating at its largest magnitude.

How it plugs in: an ``MXFormat`` is a ``NumberFormat`` whose ``encode``/``decode``/facts are
its element format's (``bits`` is the element width) plus block facts (``block_size``,
``bits_per_value``, ``granularity``, ``scale_dtype = "e8m0"``). So ``get_format("mxfp4")``
works anywhere a format does, and ``lowbit.formats.scaling`` with
``Granularity.per_group(32)`` and ``scale_dtype="e8m0"`` *is* MX quantization (that module's
e8m0 rule is the spec's). ``quantize_mx``/``dequantize_mx`` are thin wrappers over
``scaling`` that store the scales as biased exponents (uint8), as MX hardware does.

Choices where the spec leaves room: an all-zero block gets E = 0 (2^-127), as the reference
implementations do (microsoft/microxcaling, torchao); MXINT8 elements saturate
symmetrically at +-127/64 (as microxcaling does), and code -128 still decodes to -2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.formats.base import (
    FormatError,
    NumberFormat,
    check_float_input,
    get_format,
    register_format,
)
from lowbit.formats.floating import FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2
from lowbit.formats.granularity import Granularity
from lowbit.formats.integer import round_values
from lowbit.formats.scaling import QParams, dequantize, minmax, qparams_from_range, quantize

SCALE_BIAS = 127
SCALE_NAN = 255


@dataclass(frozen=True)
class FixedPointFormat(NumberFormat):
    """Signed ``bits``-wide two's complement integers ``k`` standing for ``k / 2^frac_bits``,
    saturating symmetrically at +-(2^(bits-1) - 1) / 2^frac_bits. Codes are ``k`` (int8)."""

    frac_bits: int = 0
    kind: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise FormatError(f"{self.name}: fixed-point formats have 2 to 8 bits, got {self.bits}")

    @property
    def _qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def max_value(self) -> float:
        return math.ldexp(self._qmax, -self.frac_bits)

    @property
    def min_value(self) -> float:
        return -self.max_value

    @property
    def smallest_normal(self) -> float:
        return math.ldexp(1.0, -self.frac_bits)

    @property
    def smallest_subnormal(self) -> float:
        return self.smallest_normal

    @property
    def levels(self) -> int:
        return 2 * self._qmax + 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8

    def grid(self) -> torch.Tensor:
        k = torch.arange(-self._qmax, self._qmax + 1, dtype=torch.float64)
        return k * 2.0**-self.frac_bits

    def encode(self, y, rounding="nearest", generator=None):
        check_float_input(y)
        k = round_values(y.float() * 2.0**self.frac_bits, rounding, generator)
        return k.clamp_(-self._qmax, self._qmax).to(torch.int8)

    def decode(self, codes):
        return codes.to(torch.float32) * 2.0**-self.frac_bits

    def to_bits(self, codes):
        return (codes.to(torch.int16) & ((1 << self.bits) - 1)).to(torch.uint8)

    def from_bits(self, bits):
        b = bits.to(torch.int16)
        return torch.where(b >= 1 << (self.bits - 1), b - (1 << self.bits), b).to(torch.int8)


@dataclass(frozen=True)
class MXFormat(NumberFormat):
    """An MX format: ``element`` values sharing one E8M0 scale per ``block_size`` block."""

    element: NumberFormat | None = None
    block_size: int = 32
    kind: ClassVar[str] = "mx"
    scale_dtype: ClassVar[str] = "e8m0"
    scale_bits: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if not isinstance(self.element, NumberFormat) or isinstance(self.element, MXFormat):
            raise FormatError(f"{self.name}: element must be a scalar NumberFormat, e.g. fp4_e2m1")
        if self.bits != self.element.bits:
            raise FormatError(
                f"{self.name}: bits ({self.bits}) must equal the element's ({self.element.bits})"
            )
        if self.block_size < 1:
            raise FormatError(f"{self.name}: block_size must be >= 1, got {self.block_size}")

    # -- block facts -------------------------------------------------------------------
    @property
    def bits_per_value(self) -> float:
        """Storage per element including its share of the scale: ``bits + 8 / block_size``."""
        return self.bits + self.scale_bits / self.block_size

    @property
    def granularity(self) -> Granularity:
        return Granularity.per_group(self.block_size)

    @property
    def emax_elem(self) -> int:
        """Exponent of the element format's largest normal value (spec's ``emax_elem``)."""
        return math.floor(math.log2(self.element.max_value))

    def describe(self) -> dict:
        return {
            **super().describe(),
            "element": self.element.name,
            "block_size": self.block_size,
            "bits_per_value": self.bits_per_value,
        }

    # -- element facts and functions ---------------------------------------------------
    @property
    def max_value(self) -> float:
        return self.element.max_value

    @property
    def min_value(self) -> float:
        return self.element.min_value

    @property
    def smallest_normal(self) -> float:
        return self.element.smallest_normal

    @property
    def smallest_subnormal(self) -> float:
        return self.element.smallest_subnormal

    @property
    def levels(self) -> int:
        return self.element.levels

    @property
    def code_dtype(self) -> torch.dtype:
        return self.element.code_dtype

    def grid(self) -> torch.Tensor:
        return self.element.grid()

    def encode(self, y, rounding="nearest", generator=None):
        return self.element.encode(y, rounding, generator)

    def decode(self, codes):
        return self.element.decode(codes)

    def to_bits(self, codes):
        return self.element.to_bits(codes)

    def from_bits(self, bits):
        return self.element.from_bits(bits)


def _as_mx(fmt: MXFormat | str) -> MXFormat:
    fmt = get_format(fmt)
    if not isinstance(fmt, MXFormat):
        mx_names = [f.name for f in MX_FORMATS]
        raise FormatError(f"{fmt.name} is not an MX format; use one of {mx_names}")
    return fmt


def quantize_mx(
    x: torch.Tensor,
    fmt: MXFormat | str,
    *,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX-quantize ``x`` along its last axis (a shorter last block is allowed).

    Returns ``(codes, exponents)``: element codes shaped like ``x`` and the shared
    exponents as uint8 biased by 127, shaped ``x.shape[:-1] + (ceil(K / block_size),)``.
    """
    fmt = _as_mx(fmt)
    granularity = fmt.granularity
    lo, hi = minmax(x, granularity)  # also rejects empty and non-float tensors
    qparams = qparams_from_range(lo, hi, fmt, granularity, symmetric=True, scale_dtype="e8m0")
    empty = torch.maximum(lo.abs(), hi.abs()) == 0
    scale = torch.where(empty, 2.0**-SCALE_BIAS, qparams.scale)
    qparams = QParams(fmt, granularity, scale, None, "e8m0")
    codes = quantize(x, qparams, rounding=rounding, generator=generator)
    exponents = (torch.frexp(scale).exponent - 1 + SCALE_BIAS).to(torch.uint8)
    return codes, exponents


def dequantize_mx(
    codes: torch.Tensor,
    exponents: torch.Tensor,
    fmt: MXFormat | str,
    shape: tuple[int, ...] | torch.Size | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of MX ``codes`` with biased shared ``exponents`` (from ``quantize_mx``).

    ``shape``: the original shape, when ``codes`` come flattened (e.g. after ``unpack``).
    """
    fmt = _as_mx(fmt)
    if shape is not None:
        codes = codes.reshape(tuple(shape))
    expected = fmt.granularity.param_shape(codes.shape)
    if tuple(exponents.shape) != expected:
        raise FormatError(
            f"exponents have shape {tuple(exponents.shape)} but codes of shape "
            f"{tuple(codes.shape)} need {expected} (one per {fmt.block_size} along the last axis)"
        )
    e = exponents.to(torch.int64)
    # 2^(E - 127) built from float64 bits (exact, incl. 2^-127), NaN for E = 255
    scale = ((e - SCALE_BIAS + 1023) << 52).view(torch.float64).to(torch.float32)
    scale = torch.where(e == SCALE_NAN, math.nan, scale)
    qparams = QParams(fmt, fmt.granularity, scale, None, "e8m0")
    return dequantize(codes, qparams, dtype)


MXINT8_ELEMENT = FixedPointFormat("int8_q6", 8, frac_bits=6)

MXFP8_E4M3 = register_format(MXFormat("mxfp8_e4m3", 8, element=FP8_E4M3))
MXFP8_E5M2 = register_format(MXFormat("mxfp8_e5m2", 8, element=FP8_E5M2))
MXFP6_E3M2 = register_format(MXFormat("mxfp6_e3m2", 6, element=FP6_E3M2))
MXFP6_E2M3 = register_format(MXFormat("mxfp6_e2m3", 6, element=FP6_E2M3))
MXFP4 = register_format(MXFormat("mxfp4", 4, element=FP4_E2M1))
MXINT8 = register_format(MXFormat("mxint8", 8, element=MXINT8_ELEMENT))
MX_FORMATS = (MXFP8_E4M3, MXFP8_E5M2, MXFP6_E3M2, MXFP6_E2M3, MXFP4, MXINT8)
