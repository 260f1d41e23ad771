"""Lookup (codebook) formats: a sorted table of values, a code is an index into it.

- ``nf4``: 4-bit NormalFloat of QLoRA (Dettmers et al., 2023, sec. 3 and appendix E): the
  16 values are quantiles of N(0, 1), ``q_i = Phi^-1(p_i)`` at 8 evenly spaced
  probabilities from 0.5 to ``offset = 0.9677083`` on the positive side and 7 on the
  negative side, plus an exact zero, normalized to [-1, 1]. The constants below are the
  float32 values the paper lists and bitsandbytes uses (``create_normal_map``);
  ``nf4_values()`` derives them again and the tests compare the two.
- ``log4``: a power-of-two grid ``{0} U {+-2^-k}`` (Miyashita et al., 2016, "Convolutional
  Neural Networks using Logarithmic Data Representation"). As a lookup format it rounds to
  the nearest value in the linear domain (the least squared error), where the paper rounds
  ``log2|x|``; the two differ only between the arithmetic and geometric midpoints.
- ``iq4nl``: llama.cpp's IQ4_NL table (``kvalues_iq4nl``, integers -127 .. 113, denser near
  zero), with a scale per block it is GGUF's IQ4_NL type (``gguf:iq4_nl`` recipes).
- ``codebook(values)``: any user table, e.g. k-means centroids.

``encode`` (nearest) picks the closest value; an input exactly halfway between two values
goes to the lower index (inputs are taken as float32, as for float formats). Stochastic
rounding picks one of the two neighbours with probability proportional to closeness
(unbiased within range). Values beyond the ends saturate. NF3 is not provided: the QLoRA
paper defines only NF4 precisely.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.formats.base import (
    FormatError,
    NumberFormat,
    check_float_input,
    check_rounding,
    get_format,
    grid_encode,
    register_format,
)

#: QLoRA appendix E / bitsandbytes ``create_normal_map(0.9677083)``, ascending.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_OFFSET = 0.9677083
#: llama.cpp's non-linear 4-bit table (``kvalues_iq4nl``, ggml-common.h), ascending integers
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class LookupFormat(NumberFormat):
    """``values``: strictly increasing finite numbers (stored as float32), at most 2^bits."""

    values: tuple[float, ...] = ()
    kind: ClassVar[str] = "lookup"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise FormatError(f"{self.name}: lookup formats have 1 to 8 bits, got {self.bits}")
        vals = tuple(float(v) for v in torch.tensor(self.values, dtype=torch.float32))
        if not 1 <= len(vals) <= 1 << self.bits:
            raise FormatError(
                f"{self.name}: a {self.bits}-bit codebook holds 1 to {1 << self.bits} values, "
                f"got {len(vals)}; raise bits or drop values"
            )
        if not all(math.isfinite(v) for v in vals):
            raise FormatError(f"{self.name}: codebook values must be finite")
        if any(b <= a for a, b in zip(vals, vals[1:], strict=False)):
            raise FormatError(
                f"{self.name}: codebook values must be strictly increasing after rounding to "
                f"float32; build it with codebook(values), which sorts and deduplicates"
            )
        object.__setattr__(self, "values", vals)

    # -- facts -------------------------------------------------------------------------
    @property
    def max_value(self) -> float:
        return self.values[-1]

    @property
    def min_value(self) -> float:
        return self.values[0]

    @property
    def smallest_normal(self) -> float:
        """Smallest nonzero magnitude in the table (0.0 when every value is zero)."""
        return min((abs(v) for v in self.values if v != 0), default=0.0)

    @property
    def smallest_subnormal(self) -> float:
        return self.smallest_normal

    @property
    def levels(self) -> int:
        return len(self.values)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    def grid(self) -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.float64)

    # -- pure functions ----------------------------------------------------------------
    def encode(self, y, rounding="nearest", generator=None):
        check_float_input(y)
        check_rounding(rounding)
        if rounding == "stochastic":
            return grid_encode(y, self.grid(), rounding, generator).to(torch.uint8)
        mid = _midpoints(self).to(y.device)
        flat = y.detach().reshape(-1).to(torch.float32).contiguous()
        return torch.searchsorted(mid, flat).to(torch.uint8).reshape(y.shape)

    def decode(self, codes):
        table = _table(self).to(codes.device)
        return table[codes.to(torch.int64)]


@functools.cache
def _table(fmt: LookupFormat) -> torch.Tensor:
    return torch.tensor(fmt.values, dtype=torch.float32)


@functools.cache
def _midpoints(fmt: LookupFormat) -> torch.Tensor:
    """Midpoints between neighbours, each rounded *down* to float32. The exact midpoint
    (float64) may not be a float32, but a float32 ``y`` is <= the midpoint exactly when it
    is <= the midpoint rounded down, so float32 search gives exact nearest, ties low."""
    g = fmt.grid()
    mid = (g[:-1] + g[1:]) / 2
    down = mid.to(torch.float32)
    above = down.to(torch.float64) > mid
    return torch.where(above, torch.nextafter(down, torch.tensor(-math.inf)), down)


def codebook(
    values: Sequence[float] | torch.Tensor, name: str = "codebook", bits: int | None = None
) -> LookupFormat:
    """A lookup format from any values (sorted, duplicates merged; codes index the sorted
    table). ``bits`` defaults to the fewest that index every value. Not registered: pass
    it to ``register_format`` to make it available by name."""
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() == 0:
        raise FormatError(f"{name}: a codebook needs at least one value")
    if not torch.isfinite(t).all():
        raise FormatError(f"{name}: codebook values must be finite (found NaN or Inf)")
    uniq = torch.unique(t)  # sorted
    if bits is None:
        bits = max(1, math.ceil(math.log2(uniq.numel())))
    return LookupFormat(name, bits, values=tuple(uniq.tolist()))


def log_format(bits: int, name: str | None = None) -> LookupFormat:
    """Power-of-two grid ``{0} U {+-2^-k : k = 0 .. 2^(bits-1) - 2}`` (Miyashita et al.,
    2016): a sign bit plus a (bits-1)-bit exponent, one exponent code kept for zero. For
    4 bits: 0, +-1, +-1/2, ..., +-1/64 (15 values)."""
    if not 2 <= bits <= 8:
        raise FormatError(f"log formats have 2 to 8 bits, got {bits}")
    mags = [2.0**-k for k in range((1 << (bits - 1)) - 1)]  # 1, 1/2, 1/4, ...
    values = [-m for m in mags] + [0.0] + mags[::-1]
    return LookupFormat(name or f"log{bits}", bits, values=tuple(values))


def nf4_values(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4 derived from the normal quantile function as in QLoRA (and bitsandbytes): 8
    positive quantiles at ``linspace(offset, 0.5, 9)[:-1]``, 7 negative ones at
    ``linspace(offset, 0.5, 8)[:-1]``, and 0; divided by the largest."""

    def ppf(p: torch.Tensor) -> torch.Tensor:  # Phi^-1(p) = sqrt(2) erfinv(2p - 1)
        return math.sqrt(2.0) * torch.special.erfinv(2.0 * p.double() - 1.0)

    pos = ppf(torch.linspace(offset, 0.5, 9)[:-1])
    neg = -ppf(torch.linspace(offset, 0.5, 8)[:-1])
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (v / v.max()).float()


NF4 = register_format(LookupFormat("nf4", 4, values=NF4_VALUES))
#: llama.cpp's IQ4_NL / IQ4_XS grid (``kvalues_iq4nl`` in ggml-common.h): x = d * value
IQ4NL = register_format(LookupFormat("iq4nl", 4, values=IQ4NL_VALUES))
LOG4 = register_format(log_format(4))


PREFIX = "codebook"


def _register_codebooks() -> dict[int, LookupFormat]:
    """``codebook<b>``: lookup formats whose values are the indices ``0 .. 2^b - 1``, for
    per-row centroid tables (k-means weight sharing, ``nn.codebook``)."""
    out = {}
    for bits in range(1, 9):
        name = f"{PREFIX}{bits}"
        try:
            out[bits] = get_format(name)
        except FormatError:
            out[bits] = register_format(
                LookupFormat(name, bits, values=tuple(float(i) for i in range(1 << bits))))
    return out


CODEBOOK_FORMATS = _register_codebooks()


def is_row_codebook(fmt) -> bool:
    """True for the ``codebook<b>`` index formats (per-row centroid tables)."""
    return getattr(fmt, "name", "").startswith(PREFIX) and fmt in CODEBOOK_FORMATS.values()


def codebook_format(bits: int) -> LookupFormat:
    if bits not in CODEBOOK_FORMATS:
        raise FormatError(f"codebooks have 1 to 8 bits, got {bits}")
    return CODEBOOK_FORMATS[bits]
