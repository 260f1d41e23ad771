"""Binary floating-point formats of 4 to 16 bits: FP16, BF16, FP8, FP6, FP4.

A code is the raw bit pattern ``sign | exponent | mantissa`` (uint8 up to 8 bits, FP6/FP4 in
the low bits; int16 for 16-bit formats, the pattern viewed as int16). Values follow IEEE
754: with ``E`` the exponent field and ``M`` the mantissa field of ``m`` bits,
``(-1)^s 2^(E - bias) (1 + M / 2^m)`` for ``E > 0`` and ``(-1)^s 2^(1 - bias) M / 2^m``
(subnormal) for ``E = 0``. How the top exponent field is used, ``special``:

- ``"ieee"``: all-ones exponent is Inf (``M = 0``) or NaN (FP16, BF16, FP8 E5M2);
- ``"fn"``: finite only, one NaN pattern per sign (all bits set; FP8 E4M3FN);
- ``"none"``: every pattern is a finite number (FP6 E3M2/E2M3, FP4 E2M1).

FP8 follows the OCP 8-bit Floating Point Specification (OFP8) rev 1.0 (2023) and Micikevicius
et al., "FP8 Formats for Deep Learning" (2022); FP6 and FP4 follow the OCP Microscaling
Formats (MX) Specification v1.0 (2023), section 5.3.

``encode`` rounds to nearest, ties to even (an even mantissa), or stochastically (Gupta et
al., 2015: up with probability equal to the distance from the value below, unbiased within
range). It *saturates*: finite values beyond the range and +-Inf become +-``max_value``, as
the MX spec's conversions and most quantizers do. This differs from torch's casts only out
of range, where ``.to(torch.float8_e5m2)``, ``float16`` and ``bfloat16`` overflow to Inf.
NaN becomes the format's NaN where it has one and +-``max_value`` where it has none
(``scaling`` rejects NaN inputs before they reach a format). Inputs are taken as float32,
as torch's casts do. Formats with a torch dtype use the (exact) torch cast for nearest
rounding; the others, and stochastic rounding, use an exact float32 emulation that gives
the same codes (checked against the casts in the tests).
"""

from __future__ import annotations

import functools
import math
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

SPECIALS = ("ieee", "fn", "none")


@dataclass(frozen=True)
class FloatFormat(NumberFormat):
    """Sign, ``exp_bits`` exponent bits (biased by ``bias``) and ``man_bits`` mantissa bits."""

    exp_bits: int = 4
    man_bits: int = 3
    bias: int = 7
    special: str = "fn"
    kind: ClassVar[str] = "float"

    def __post_init__(self) -> None:
        if self.special not in SPECIALS:
            raise FormatError(
                f"{self.name}: special must be one of {SPECIALS}, got {self.special!r}"
            )
        if self.exp_bits < 1 or self.man_bits < 0 or self.bits != 1 + self.exp_bits + self.man_bits:
            raise FormatError(
                f"{self.name}: bits={self.bits} must equal 1 + exp_bits + man_bits "
                f"(= {1 + self.exp_bits + self.man_bits}) with exp_bits >= 1"
            )
        if self.bits > 16:
            raise FormatError(f"{self.name}: float formats have at most 16 bits; use float32")
        if self.special == "fn" and self.man_bits == 0:
            raise FormatError(f"{self.name}: special='fn' needs at least one mantissa bit")
        if self.emin < -126 or self.emax > 127:
            raise FormatError(
                f"{self.name}: normal exponents {self.emin}..{self.emax} must fit float32's "
                f"-126..127 (choose a bias of at most 127 that keeps emax <= 127)"
            )

    # -- facts -------------------------------------------------------------------------
    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value, ``1 - bias``."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        top = (1 << self.exp_bits) - 1
        return (top - 1 if self.special == "ieee" else top) - self.bias

    @property
    def max_value(self) -> float:
        drop = 2 if self.special == "fn" else 1  # E4M3FN gives S.1111.111 to NaN
        return math.ldexp((1 << (self.man_bits + 1)) - drop, self.emax - self.man_bits)

    @property
    def min_value(self) -> float:
        return -self.max_value

    @property
    def smallest_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def smallest_subnormal(self) -> float:
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def _special_codes(self) -> int:
        """Non-finite patterns per sign."""
        return {"ieee": 1 << self.man_bits, "fn": 1, "none": 0}[self.special]

    @property
    def levels(self) -> int:
        """Distinct finite values (+0 and -0 counted once)."""
        return 2 * ((1 << (self.bits - 1)) - self._special_codes) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bits <= 8 else torch.int16

    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def nan_code(self) -> int | None:
        """The (positive, quiet) NaN pattern, or None when the format has no NaN."""
        if self.special == "none":
            return None
        if self.special == "fn":
            return (1 << (self.bits - 1)) - 1
        return (((1 << self.exp_bits) - 1) << self.man_bits) | (1 << max(self.man_bits - 1, 0))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with exactly this encoding, if there is one."""
        key = (self.exp_bits, self.man_bits, self.bias, self.special)
        return _TORCH_DTYPES.get(key)

    def grid(self) -> torch.Tensor:
        return _grid(self).clone()

    # -- bit fields --------------------------------------------------------------------
    def bit_fields(self, code):
        """``(sign, exponent, mantissa)`` fields of ``code`` (an int or an integer tensor)."""
        if isinstance(code, torch.Tensor):
            c = code.to(torch.int32) & ((1 << self.bits) - 1)
        else:
            c = int(code) & ((1 << self.bits) - 1)
        m = self.man_bits
        return (c >> (self.bits - 1)) & 1, (c >> m) & ((1 << self.exp_bits) - 1), c & ((1 << m) - 1)

    def bit_string(self, code: int) -> str:
        """``code`` as ``"s eeee mmm"``, e.g. ``0 1000 000`` for 2.0 in E4M3."""
        s, e, m = self.bit_fields(int(code))
        man = format(m, f"0{self.man_bits}b") if self.man_bits else ""
        return f"{s} {e:0{self.exp_bits}b} {man}".rstrip()

    # -- pure functions ----------------------------------------------------------------
    def encode(self, y, rounding="nearest", generator=None):
        check_float_input(y)
        check_rounding(rounding)
        y = y.detach().float()
        if rounding == "nearest" and self.torch_dtype is not None:
            limit = self.max_value
            return y.clamp(-limit, limit).to(self.torch_dtype).view(self.code_dtype)
        return self._encode_emulated(y, rounding, generator)

    def _encode_emulated(self, y, rounding, generator):
        """Exact rounding in float32. With ``e = max(floor(log2|y|), emin)`` (read from the
        float32 exponent bits), ``r = |y| / 2^(e - m)`` is the significand as an integer plus
        a fraction; it is rounded, and the magnitude code is ``(e - emin) 2^m + r`` (a carry
        into the next binade falls out of the same sum)."""
        m, lo = self.man_bits, self.emin + 127
        a = torch.fmin(y.abs(), torch.tensor(self.max_value, device=y.device))  # NaN -> max
        eb = (a.view(torch.int32) >> 23).clamp_(lo, self.emax + 127)  # biased exponent
        # r = |y| / 2^e * 2^m, exact: 2^e is a float32 normal (built from its bits) and
        # dividing or multiplying by a power of two loses nothing here
        r = a.div_((eb << 23).view(torch.float32)).mul_(float(1 << m))
        if rounding == "nearest":
            r = r.round_()  # half to even
        else:
            low = torch.floor(r)
            u = torch.rand(r.shape, generator=generator, dtype=r.dtype, device=r.device)
            r = low.add_((u < r.sub_(low)).to(r.dtype))
        mag = ((eb - lo) << m).add_(r.to(torch.int32))
        if self.bits <= 8:
            sign = (y.view(torch.int32) >> (32 - self.bits)) & (1 << (self.bits - 1))
            code = mag.bitwise_or_(sign).to(torch.uint8)
        else:  # int16 view of the pattern: a set sign bit makes it mag - 2^(bits - 1)
            code = torch.where(torch.signbit(y), mag - (1 << (self.bits - 1)), mag)
            code = code.to(torch.int16)
        if self.nan_code is not None:
            nan = torch.tensor(self.nan_code, dtype=code.dtype, device=code.device)
            code = torch.where(torch.isnan(y), nan, code)
        return code

    def decode(self, codes):
        td = self.torch_dtype
        if td is not None and codes.dtype == self.code_dtype:
            return codes.view(td).to(torch.float32)
        table = _value_table(self).to(codes.device)
        return table[codes.to(torch.int64) & ((1 << self.bits) - 1)]

    def to_bits(self, codes):
        """Unsigned patterns: uint8 up to 8 bits; int32 in [0, 2^16) for 16-bit formats,
        which are stored as they are (``packing`` handles 1-8 bits)."""
        if self.bits <= 8:
            return codes.to(torch.uint8)
        return codes.to(torch.int32) & ((1 << self.bits) - 1)

    def from_bits(self, bits):
        if self.bits <= 8:
            return bits.to(torch.uint8)
        b = bits.to(torch.int32)
        top = 1 << (self.bits - 1)
        return torch.where(b >= top, b - 2 * top, b).to(torch.int16)


@functools.cache
def _value_table(fmt: FloatFormat) -> torch.Tensor:
    """float32 value of every code ``0 .. 2^bits - 1`` (Inf and NaN included)."""
    c = torch.arange(1 << fmt.bits, dtype=torch.int64)
    sign, e, mant = fmt.bit_fields(c)
    m = fmt.man_bits
    significand = torch.where(e > 0, mant + (1 << m), mant).to(torch.float64)
    values = significand * torch.exp2((e.clamp_min(1) - fmt.bias - m).to(torch.float64))
    values = torch.where(sign.bool(), -values, values)
    top = e == (1 << fmt.exp_bits) - 1
    if fmt.special == "ieee":
        inf = torch.where(sign.bool(), -math.inf, math.inf)
        values = torch.where(top & (mant == 0), inf, values)
        values = torch.where(top & (mant != 0), math.nan, values)
    elif fmt.special == "fn":
        values = torch.where(top & (mant == (1 << m) - 1), math.nan, values)
    return values.to(torch.float32)


@functools.cache
def _grid(fmt: FloatFormat) -> torch.Tensor:
    table = _value_table(fmt).to(torch.float64)
    return torch.unique(table[torch.isfinite(table)]) + 0.0  # -0.0 + 0.0 == +0.0


_TORCH_DTYPES = {
    (5, 10, 15, "ieee"): torch.float16,
    (8, 7, 127, "ieee"): torch.bfloat16,
    (4, 3, 7, "fn"): torch.float8_e4m3fn,
    (5, 2, 15, "ieee"): torch.float8_e5m2,
}

FP16 = register_format(FloatFormat("fp16", 16, exp_bits=5, man_bits=10, bias=15, special="ieee"))
BF16 = register_format(FloatFormat("bf16", 16, exp_bits=8, man_bits=7, bias=127, special="ieee"))
FP8_E4M3 = register_format(
    FloatFormat("fp8_e4m3", 8, exp_bits=4, man_bits=3, bias=7, special="fn"), "e4m3", "fp8"
)
FP8_E5M2 = register_format(
    FloatFormat("fp8_e5m2", 8, exp_bits=5, man_bits=2, bias=15, special="ieee"), "e5m2"
)
FP6_E3M2 = register_format(
    FloatFormat("fp6_e3m2", 6, exp_bits=3, man_bits=2, bias=3, special="none")
)
FP6_E2M3 = register_format(
    FloatFormat("fp6_e2m3", 6, exp_bits=2, man_bits=3, bias=1, special="none")
)
FP4_E2M1 = register_format(
    FloatFormat("fp4_e2m1", 4, exp_bits=2, man_bits=1, bias=1, special="none"), "fp4"
)
