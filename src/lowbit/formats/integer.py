"""Integer grids of 1-8 bits (signed two's complement or unsigned), binary and ternary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.formats.base import (
    FormatError,
    NumberFormat,
    check_float_input,
    check_rounding,
    register_format,
)


def round_values(
    y: torch.Tensor, rounding: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round to integers: ``nearest`` is round-half-to-even, ``stochastic`` is
    floor(y + u) with u ~ U[0, 1) (unbiased: E[round(y)] = y; Gupta et al., 2015)."""
    check_rounding(rounding)
    if rounding == "nearest":
        return torch.round(y)
    noise = torch.rand(y.shape, generator=generator, dtype=y.dtype, device=y.device)
    return torch.floor(y + noise)


@dataclass(frozen=True)
class IntFormat(NumberFormat):
    """``bits``-wide integers: signed covers [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""

    signed: bool = True
    kind: ClassVar[str] = "int"
    supports_zero_point: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise FormatError(
                f"integer formats have 1 to 8 bits, got {self.bits}; "
                f"use fp16/bf16 for wider numbers"
            )

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def max_value(self) -> float:
        return float(self.qmax)

    @property
    def min_value(self) -> float:
        return float(self.qmin)

    @property
    def smallest_normal(self) -> float:
        return 1.0

    @property
    def smallest_subnormal(self) -> float:
        return 1.0

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    def grid(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float64)

    def encode(self, y, rounding="nearest", generator=None):
        check_float_input(y)
        q = round_values(y, rounding, generator).clamp_(self.qmin, self.qmax)
        return q.to(self.code_dtype)

    def decode(self, codes):
        return codes.to(torch.float32)

    def to_bits(self, codes):
        if self.bits == 8:  # two's complement bytes are already the pattern
            return codes.to(self.code_dtype).view(torch.uint8)
        mask = (1 << self.bits) - 1
        if codes.dtype in (torch.uint8, torch.int8):  # two's complement: the low bits
            return codes.view(torch.uint8) & mask  # (no wider temporary of a large weight)
        return (codes.to(torch.int16) & mask).to(torch.uint8)

    def from_bits(self, bits):
        if self.bits == 8:
            return bits.to(torch.uint8).view(self.code_dtype)
        if not self.signed:
            return bits.to(torch.uint8)
        b = bits.to(torch.int8)  # patterns < 2^bits <= 128
        return torch.where(b >= (1 << (self.bits - 1)), b - (1 << self.bits), b)


@dataclass(frozen=True)
class SignFormat(NumberFormat):
    """Binary {-1, +1} (``zero=False``, BinaryConnect / XNOR-Net) or ternary {-1, 0, +1}
    (``zero=True``, Ternary Weight Networks). Codes are the values as int8."""

    zero: bool = False
    kind: ClassVar[str] = "int"

    @property
    def max_value(self) -> float:
        return 1.0

    @property
    def min_value(self) -> float:
        return -1.0

    @property
    def smallest_normal(self) -> float:
        return 1.0

    @property
    def smallest_subnormal(self) -> float:
        return 1.0

    @property
    def levels(self) -> int:
        return 3 if self.zero else 2

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8

    def grid(self) -> torch.Tensor:
        values = [-1.0, 0.0, 1.0] if self.zero else [-1.0, 1.0]
        return torch.tensor(values, dtype=torch.float64)

    def encode(self, y, rounding="nearest", generator=None):
        check_float_input(y)
        if self.zero:
            return round_values(y, rounding, generator).clamp_(-1, 1).to(torch.int8)
        if rounding == "nearest":
            # sign with 0 -> +1, so every value has a code
            return torch.where(y < 0, -1, 1).to(torch.int8)
        # stochastic binarization (Courbariaux et al., 2016): P(+1) = (y + 1) / 2
        p = ((y + 1) / 2).clamp(0, 1)
        rand = torch.rand(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        return torch.where(rand < p, 1, -1).to(torch.int8)

    def decode(self, codes):
        return codes.to(torch.float32)

    def to_bits(self, codes):
        return (codes.to(torch.int16) + 1).div(1 if self.zero else 2, rounding_mode="floor").to(
            torch.uint8
        )

    def from_bits(self, bits):
        if self.bits == 8:
            return bits.to(torch.uint8).view(self.code_dtype)
        b = bits.to(torch.int16)
        return (b - 1 if self.zero else 2 * b - 1).to(torch.int8)


for _b in range(1, 9):
    register_format(IntFormat(f"int{_b}", _b, signed=True))
    register_format(IntFormat(f"uint{_b}", _b, signed=False))
BINARY = register_format(SignFormat("binary", 1, zero=False), "bnn")
TERNARY = register_format(SignFormat("ternary", 2, zero=True), "tnn")
