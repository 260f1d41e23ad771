"""All scale and zero-point math: choose parameters, quantize, dequantize, fake-quantize.

Uniform affine quantization (Jacob et al., 2018, eq. 1: r = S (q - Z)):
- symmetric (absmax): ``scale = max|x| / fmt.max_value``, no zero-point;
- asymmetric (min/max): the range is widened to include 0, ``scale = (max - min) /
  (qmax - qmin)`` and the integer ``zero_point = round(qmin - min / scale)`` so that 0.0 is
  represented exactly (integer formats only).
``quantize`` computes ``codes = fmt.encode(x / scale + zero_point)`` and ``dequantize``
computes ``(fmt.decode(codes) - zero_point) * scale``; any format of ``lowbit.formats``
(integer, float, lookup) plugs in through ``encode``/``decode``.

Scale dtypes: ``fp32``, ``fp16``, ``bf16`` (the scale is rounded to that dtype and stored
in it), ``e8m0`` (a power of two, the OCP MX rule: ``2^(floor(log2 amax) - emax)``
where ``emax = floor(log2 fmt.max_value)``; values above the format's maximum saturate) and
the super-block dtypes ``fp16*u6``, ``fp16*i8``, ``fp16*i6``, ``fp16*u4`` (llama.cpp's
k-quants: each group's scale, and min, is an integer times a float16 shared by 256 inputs;
``formats.superblock``; stored as the exact float32 products, the float zero-point in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats.base import FormatError, NumberFormat, check_float_input, get_format
from lowbit.formats.granularity import PER_TENSOR, Granularity
from lowbit.formats.superblock import SUPER_SCALES, SuperScale, snap, super_scale
from lowbit.formats.superblock import check as check_super

SCALE_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "e8m0": torch.float32,
} | {name: torch.float32 for name in SUPER_SCALES}


@dataclass
class QParams:
    """Scale and optional zero-point of one quantized tensor, with how they were laid out."""

    format: NumberFormat
    granularity: Granularity
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    scale_dtype: str = "fp32"

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def expand(self, shape: torch.Size | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point (0 when symmetric) broadcastable against ``shape``, float32."""
        scale = self.granularity.expand(self.scale.float(), shape)
        if self.zero_point is None:
            return scale, torch.zeros((), dtype=torch.float32, device=scale.device)
        return scale, self.granularity.expand(self.zero_point.float(), shape)


def check_finite_stats(*stats: torch.Tensor) -> None:
    """Raise when a statistic shows NaN or Inf in the data (checked on the reduced stats,
    which NaN and Inf always reach, so it costs no extra pass over the data)."""
    for s in stats:
        if s.numel() and not torch.isfinite(s).all():
            raise FormatError(
                "input contains NaN or Inf; quantization needs finite values "
                "(clean the tensor, e.g. torch.nan_to_num(x), or find where it overflowed)"
            )


def minmax(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter minimum and maximum of ``x`` (float32, shape ``param_shape``)."""
    check_float_input(x)
    if x.numel() == 0:
        raise FormatError("cannot quantize an empty tensor (it has 0 elements)")
    lo, hi = torch.aminmax(granularity.rows(x.detach()), dim=1)
    shape = granularity.param_shape(x.shape)
    return lo.float().reshape(shape), hi.float().reshape(shape)


def _round_scale(scale: torch.Tensor, fmt: NumberFormat, scale_dtype: str) -> torch.Tensor:
    if scale_dtype not in SCALE_DTYPES:
        raise FormatError(f"unknown scale dtype {scale_dtype!r}; use one of {list(SCALE_DTYPES)}")
    if scale_dtype == "e8m0":
        emax = math.floor(math.log2(fmt.max_value))
        amax = scale * fmt.max_value
        return torch.exp2(torch.floor(torch.log2(amax)) - emax).clamp(2.0**-127, 2.0**127)
    target = SCALE_DTYPES[scale_dtype]
    rounded = scale.to(target)
    # a scale that rounds to 0 or overflows in a half dtype would break dequantization
    tiny = torch.finfo(target).tiny
    magnitude = torch.nan_to_num(rounded.abs(), posinf=torch.finfo(target).max).clamp_min(tiny)
    return torch.where(rounded < 0, -magnitude, magnitude)  # signed scales keep their sign


def qparams_from_range(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    fmt: NumberFormat | str,
    granularity: Granularity = PER_TENSOR,
    *,
    symmetric: bool = True,
    scale_dtype: str = "fp32",
    integer_zero_point: bool = True,
    signed_scale: bool = False,
) -> QParams:
    """Scale (and zero-point) that map ``[min_val, max_val]`` onto ``fmt``'s grid.

    ``signed_scale`` (symmetric formats whose negative end is the longer one: int4's -8,
    IQ4_NL's -127): the scale takes the sign that puts the range's largest-magnitude end on
    ``fmt.min_value``, ``scale = extreme / min_value`` (negative when that end is positive),
    as llama.cpp's Q4_0 / Q5_0 / IQ4_NL quantizers choose ``d = max / -8``: one more step of
    the grid spans the range than with ``amax / max_value``; the opposite end may clip by
    less than a step.

    ``integer_zero_point=False`` keeps the asymmetric zero-point unrounded, so the grid is
    ``min + scale * k`` (llama.cpp's Q4_1, torchao's int4): the range's ends are hit (up to
    the zero-point's own rounding), at the price of 0.0 no longer being exactly representable.
    The float zero-point is float16 beside a 16-bit scale for codes of at most 4 bits (it lies
    in ``[qmin, qmax] <= 15``, where float16 steps are at most ``2^-7`` of a quantization step;
    the int4 kernel rounds its zeros to bf16 anyway), else float32.

    The single place where a range becomes quantization parameters: observers and
    algorithms call it with ranges they estimated or searched.
    """
    fmt = get_format(fmt)
    min_val, max_val = min_val.float(), max_val.float()
    check_finite_stats(min_val, max_val)
    kind = super_scale(scale_dtype)
    if kind is not None:
        return _super_qparams(kind, min_val, max_val, fmt, granularity, symmetric,
                              integer_zero_point)
    if symmetric:
        if fmt.min_value >= 0:
            raise FormatError(
                f"{fmt.name} is unsigned and cannot be symmetric around 0; "
                f"use symmetric=False or a signed format"
            )
        amax = torch.maximum(min_val.abs(), max_val.abs())
        scale = amax / fmt.max_value
        if signed_scale and -fmt.min_value > fmt.max_value:
            extreme = torch.where(min_val.abs() >= max_val.abs(), min_val, max_val)
            scale = extreme / fmt.min_value
        empty = amax == 0
        scale = _round_scale(torch.where(empty, torch.ones_like(scale), scale), fmt, scale_dtype)
        return QParams(fmt, granularity, scale, None, scale_dtype)
    if not fmt.supports_zero_point:
        raise FormatError(
            f"asymmetric quantization needs an integer format with a zero-point; {fmt.name} "
            f"has none: use symmetric=True"
        )
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    qmin, qmax = fmt.min_value, fmt.max_value
    span = hi - lo
    scale = torch.where(span > 0, span / (qmax - qmin), torch.ones_like(span))
    scale = _round_scale(scale, fmt, scale_dtype)
    zero_point = qmin - lo / scale.float()
    if not integer_zero_point:
        return QParams(fmt, granularity, scale, zero_point.to(_float_zero_dtype(fmt, scale_dtype)),
                       scale_dtype)
    zero_point = torch.round(zero_point).clamp(qmin, qmax)
    return QParams(fmt, granularity, scale, zero_point.to(fmt.code_dtype), scale_dtype)


def _super_qparams(kind: SuperScale, min_val, max_val, fmt: NumberFormat,
                   granularity: Granularity, symmetric: bool,
                   integer_zero_point: bool) -> QParams:
    """``qparams_from_range`` for a super-block dtype: the min/max (absmax) scale and min of
    each group, then ``superblock.snap`` of each row's super-blocks together."""
    check_super(kind, fmt, granularity, symmetric, integer_zero_point)
    gs = granularity.group_size
    if symmetric:
        amax = torch.maximum(min_val.abs(), max_val.abs())
        scale, _ = snap(kind, amax / fmt.max_value, None, gs)
        return QParams(fmt, granularity, scale, None, kind.name)
    lo, hi = torch.clamp(min_val, max=0.0), torch.clamp(max_val, min=0.0)
    scale, offset = snap(kind, (hi - lo) / (fmt.max_value - fmt.min_value), -lo, gs)
    return QParams(fmt, granularity, scale, fmt.min_value + offset / scale, kind.name)


def snap_qparams(qparams: QParams) -> QParams:
    """``qparams`` back on its scale dtype's grid after an algorithm moved them (refit,
    rescaled rows, HQQ): for a super-block dtype, each row's group scales and mins
    ``(zero_point - qmin) * scale`` re-quantized together (``superblock.snap``); any other
    dtype is returned as it is."""
    kind = super_scale(qparams.scale_dtype)
    if kind is None:
        return qparams
    fmt, zero = qparams.format, qparams.zero_point
    scale = qparams.scale.float()
    offset = None if zero is None else (zero.float() - fmt.min_value) * scale
    scale, offset = snap(kind, scale, offset, qparams.granularity.group_size)
    zero = None if offset is None else fmt.min_value + offset / scale
    return QParams(fmt, qparams.granularity, scale, zero, qparams.scale_dtype)


def _float_zero_dtype(fmt: NumberFormat, scale_dtype: str) -> torch.dtype:
    """2 bytes per group for a <= 4-bit format with 16-bit scales, else 4 (see above)."""
    return torch.float16 if scale_dtype in ("bf16", "fp16") and fmt.bits <= 4 else torch.float32


def compute_qparams(
    x: torch.Tensor,
    fmt: NumberFormat | str,
    granularity: Granularity | str = PER_TENSOR,
    *,
    symmetric: bool = True,
    scale_dtype: str = "fp32",
    integer_zero_point: bool = True,
    signed_scale: bool = False,
) -> QParams:
    """Min/max (asymmetric) or absmax (symmetric) parameters computed directly from ``x``."""
    granularity = Granularity.parse(granularity)
    lo, hi = minmax(x, granularity)
    return qparams_from_range(
        lo, hi, fmt, granularity, symmetric=symmetric, scale_dtype=scale_dtype,
        integer_zero_point=integer_zero_point, signed_scale=signed_scale,
    )


def _grouped(qparams: QParams, shape: tuple[int, ...]) -> bool:
    return qparams.granularity.kind == "group" and len(shape) > 0


def _row_params(qparams: QParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero-point as columns matching ``granularity.rows`` (group granularity)."""
    scale = qparams.scale.float().reshape(-1, 1)
    zp = None if qparams.zero_point is None else qparams.zero_point.float().reshape(-1, 1)
    return scale, zp


def _from_rows(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Undo ``Granularity.rows`` for groups: drop the padding of a partial last group."""
    k = shape[-1]
    padded = rows.reshape(*shape[:-1], -1)
    return padded if padded.shape[-1] == k else padded[..., :k]


def quantize(
    x: torch.Tensor,
    qparams: QParams,
    *,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Codes of ``x`` under ``qparams`` (same shape as ``x``)."""
    check_float_input(x)
    if _grouped(qparams, tuple(x.shape)):
        scale, zero_point = _row_params(qparams)
        y = qparams.granularity.rows(x.float()) / scale
        if zero_point is not None:
            y += zero_point
        return _from_rows(qparams.format.encode(y, rounding, generator), tuple(x.shape))
    scale, zero_point = qparams.expand(x.shape)
    y = x.float() / scale
    if qparams.zero_point is not None:
        y += zero_point
    return qparams.format.encode(y, rounding, generator)


def dequantize(
    codes: torch.Tensor, qparams: QParams, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Values the codes stand for: ``(decode(codes) - zero_point) * scale``."""
    values = qparams.format.decode(codes)
    if _grouped(qparams, tuple(codes.shape)):
        scale, zero_point = _row_params(qparams)
        rows = qparams.granularity.rows(values)
        if zero_point is not None:
            rows = rows - zero_point
        return _from_rows(rows * scale, tuple(codes.shape)).to(dtype)
    scale, zero_point = qparams.expand(codes.shape)
    if qparams.zero_point is not None:
        values = values - zero_point
    return (values * scale).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    qparams: QParams,
    *,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in the forward pass with a clipped straight-through
    gradient in the backward pass (Bengio et al., 2013; as in Jacob et al., 2018): the
    gradient is 1 where ``x`` lies inside the representable range and 0 where it clipped."""
    scale, zero_point = qparams.expand(x.shape)
    lo = (qparams.format.min_value - zero_point) * scale
    hi = (qparams.format.max_value - zero_point) * scale
    clipped = torch.minimum(torch.maximum(x, lo.to(x.dtype)), hi.to(x.dtype))
    with torch.no_grad():
        dq = dequantize(quantize(x.detach(), qparams, rounding=rounding, generator=generator),
                        qparams, x.dtype)
    return clipped + (dq - clipped).detach()


def quantize_tensor(
    x: torch.Tensor,
    fmt: NumberFormat | str,
    granularity: Granularity | str = PER_TENSOR,
    *,
    symmetric: bool = True,
    scale_dtype: str = "fp32",
    rounding: str = "nearest",
) -> tuple[torch.Tensor, QParams]:
    """Convenience: ``compute_qparams`` then ``quantize``; returns ``(codes, qparams)``."""
    qparams = compute_qparams(x, fmt, granularity, symmetric=symmetric, scale_dtype=scale_dtype)
    return quantize(x, qparams, rounding=rounding), qparams
