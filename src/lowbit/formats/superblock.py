"""Scale dtypes whose group scales (and mins) are small integers times one float16 per 256
inputs: the super-block scales of llama.cpp's k-quants.

llama.cpp's k-quants (``ggml-common.h``: ``block_q2_K`` .. ``block_q6_K``; ``ggml-quants.c``:
``quantize_row_q*_K_ref``) cut a row into super-blocks of ``QK_K = 256`` inputs. Each
sub-block (a lowbit group of 16 or 32 inputs) has ``scale_j = d * sc_j`` and, where the type
has a min, ``min_j = dmin * m_j``, so ``x = scale_j * q - min_j``; ``d`` and ``dmin`` are
float16, ``sc_j`` and ``m_j`` integers:

| scale dtype | sc                  | m     | llama.cpp types            |
|-------------|---------------------|-------|----------------------------|
| ``fp16*u6`` | 0 .. 63             | 0..63 | Q4_K, Q5_K (groups of 32)  |
| ``fp16*i8`` | -128 .. 127, d < 0  |       | Q6_K (groups of 16)        |
| ``fp16*i6`` | -32 .. 31, d < 0    |       | Q3_K (groups of 16)        |
| ``fp16*u4`` | 0 .. 15             | 0..15 | Q2_K (groups of 16)        |

``snap`` puts float scales (and mins) on that grid with the reference quantizers' arithmetic
(float32): ``inv = levels / max_j scale_j``, ``sc_j = nearest(inv * scale_j)``, ``d =
fp16(max / levels)``; the signed types take ``iscale = -levels / max``, ``d = fp16(1 /
iscale)`` (``quantize_row_q6_K_ref``, ``quantize_row_q3_K_ref``), so the largest scale gets
``sc = -128`` (-32). One change: a scale never becomes 0 (``|sc| >= 1``), since lowbit divides
by it. A lowbit ``QParams`` stores the effective ``scale = d * sc`` (exact in float32) and, for
the asymmetric types, the float zero-point ``min / scale``; ``split`` recovers ``d`` and
``sc`` (``dmin`` and ``m``) from those products for the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import FormatError, NumberFormat
from lowbit.formats.granularity import Granularity

#: inputs per super-block (llama.cpp's ``QK_K``)
QK_K = 256
#: the smallest positive float16 (a subnormal): the floor of a super-block scale
F16_TINY = 2.0**-24


@dataclass(frozen=True)
class SuperScale:
    """One super-block scale grid: ``|sc| <= levels``, ``m <= min_levels`` (0: no min)."""

    name: str
    levels: int
    min_levels: int
    #: ``d < 0`` and ``sc <= -1``: a signed ``sc`` reaches ``-levels`` (int8: -128)
    negative: bool

    @property
    def symmetric(self) -> bool:
        return self.min_levels == 0


SUPER_SCALES = {s.name: s for s in (
    SuperScale("fp16*u6", 63, 63, False),
    SuperScale("fp16*i8", 128, 0, True),
    SuperScale("fp16*i6", 32, 0, True),
    SuperScale("fp16*u4", 15, 15, False),
)}


def super_scale(scale_dtype: str) -> SuperScale | None:
    """The grid of ``scale_dtype``, or None for a plain dtype (fp32, fp16, bf16, e8m0)."""
    return SUPER_SCALES.get(scale_dtype)


def check(kind: SuperScale, fmt: NumberFormat, granularity: Granularity, symmetric: bool,
          integer_zero_point: bool = False) -> None:
    """Raise unless the weight layout can take ``kind``'s scales."""
    if granularity.kind != "group" or QK_K % granularity.group_size:
        raise FormatError(f"scale dtype {kind.name} quantizes the scales of groups inside "
                          f"super-blocks of {QK_K} inputs: use granularity 'group:N' with N "
                          f"dividing {QK_K} (16 or 32 in llama.cpp), got {granularity}")
    if fmt.kind != "int":
        raise FormatError(f"scale dtype {kind.name} needs an integer format, got {fmt.name}")
    if kind.symmetric and not (symmetric and fmt.min_value < 0):
        raise FormatError(f"scale dtype {kind.name} has no min: use a signed format with "
                          f"symmetric=True (as Q6_K/Q3_K: int6/int3)")
    if not kind.symmetric and (symmetric or fmt.min_value != 0 or integer_zero_point):
        raise FormatError(f"scale dtype {kind.name} stores a min per group: use an unsigned "
                          f"format with symmetric=False and integer_zero_point=False (as "
                          f"Q4_K/Q5_K/Q2_K: uint4/uint5/uint2)")


def _blocks(x: torch.Tensor, per: int) -> torch.Tensor:
    """``[..., G]`` group values -> ``[..., S, per]`` super-blocks (a partial one zero-padded)."""
    pad = -x.shape[-1] % per
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, per)


def _unblocks(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-2], -1)[..., :groups]


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Rounded to float16 (nearest even, subnormals kept, overflow saturated), as float32."""
    return torch.nan_to_num(x.to(torch.float16), posinf=65504.0, neginf=-65504.0).float()


def _quantize_levels(values: torch.Tensor, levels: int, negative: bool,
                     floor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d [..., S, 1], q [..., S, per])`` with ``d * q ~ values`` (``values >= 0``),
    ``floor <= |q| <= levels``, ``d`` float16; float32 arithmetic of ``quantize_row_q*_K_ref``."""
    top = values.amax(-1, keepdim=True)
    live = top > 0
    if negative:
        iscale = torch.where(live, -levels / top.clamp_min(1e-38), torch.zeros_like(top))
        q = torch.round(iscale * values).clamp(-levels, -floor)
        d = _fp16(torch.where(live, 1 / iscale, torch.zeros_like(top)))
    else:
        inv = torch.where(live, levels / top.clamp_min(1e-38), torch.zeros_like(top))
        q = torch.round(inv * values).clamp(floor, levels)
        d = _fp16(top / levels)
    if floor:  # a scale is never 0: where d underflows (a zero super-block), d = +-2^-24
        sign = -1.0 if negative else 1.0
        under = d == 0
        d = torch.where(under, torch.full_like(d, sign * F16_TINY), d)
        q = torch.where(under, sign * torch.round(values / F16_TINY).clamp(floor, levels), q)
    return d, q


def snap(kind: SuperScale, scale: torch.Tensor, offset: torch.Tensor | None,
         group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Group scales ``[..., G]`` (``>= 0``) and offsets (the min subtracted, ``x = scale * q -
    offset``; clamped at 0) on ``kind``'s grid: float32, exact products ``d * sc`` and
    ``dmin * m`` of each super-block of ``QK_K / group_size`` consecutive groups."""
    per, groups = QK_K // group_size, scale.shape[-1]
    d, sc = _quantize_levels(_blocks(scale.float().clamp_min(0), per), kind.levels,
                             kind.negative, floor=1)
    new_scale = _unblocks(d * sc, groups)
    if offset is None:
        return new_scale, None
    dmin, m = _quantize_levels(_blocks(offset.float().clamp_min(0), per), kind.min_levels,
                               False, floor=0)
    return new_scale, _unblocks(dmin * m, groups)


def split(values: torch.Tensor, levels: int, negative: bool = False,
          rtol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``snap`` on one super-block per row: ``values [n, per]`` (float64, ``>=
    0``, products ``d * q`` known to within ``rtol``) -> float16-exact ``d [n]`` (float32) and
    integers ``q [n, per]`` (int16) with ``d * q == values`` (within ``rtol``), ``|q| <= levels``,
    the signs of ``snap`` (``negative``: ``d < 0``, ``q < 0``). Any such pair dequantizes the same.
    ``FormatError`` names the first super-block that is on no such grid.

    Tried: the largest value is ``d * k`` for ``k = levels, levels - 1, ... 1``. With ``rtol``
    below ``2^-18`` the answer is unique: distinct products of an 11-bit float16 significand and
    a <= 8-bit integer differ by more than ``2^-17`` relatively."""
    n = values.shape[0]
    top = values.amax(1)
    d = torch.zeros(n, dtype=torch.float64)
    q = torch.zeros(values.shape, dtype=torch.float64)
    done = top <= 0
    for k in range(levels, 0, -1):
        if bool(done.all()):
            break
        cand = (top / k).to(torch.float16).double()
        cq = torch.round(values / cand[:, None])
        ok = ~done & (cand > 0) & (cq <= levels).all(1) & (
            (cq * cand[:, None] - values).abs() <= rtol * values).all(1)
        d = torch.where(ok, cand, d)
        q = torch.where(ok[:, None], cq, q)
        done |= ok
    if not bool(done.all()):
        bad = int((~done).nonzero()[0])
        raise FormatError(f"super-block {bad}: values {values[bad, :4].tolist()}... are not "
                          f"a float16 times integers <= {levels}")
    sign = -1.0 if negative else 1.0
    return (sign * d).float(), (sign * q).to(torch.int16)
