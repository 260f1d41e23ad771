"""The one description of how a weight is quantized, shared by every layer.

Recipes hold it, algorithms solve on it, packed modules store by it, exporters map it to
their types. ``granularity`` is a ``Granularity`` object (a string such as ``"group:128"``
is parsed once, here); groups run along the input dimension of a ``[out, in]`` weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import FormatError, NumberFormat, get_format
from lowbit.formats.granularity import Granularity
from lowbit.formats.rotation import check_rotation
from lowbit.formats.scaling import SCALE_DTYPES, QParams, compute_qparams, qparams_from_range
from lowbit.formats.superblock import check as check_super
from lowbit.formats.superblock import super_scale


@dataclass(frozen=True)
class WeightSpec:
    """Format, granularity, symmetry, scale dtype, zero-point kind and input rotation."""

    format: str | NumberFormat = "int8"
    granularity: Granularity | str = "channel"
    symmetric: bool = True
    scale_dtype: str = "fp32"
    #: False: the asymmetric zero-point is a float (grid = min + scale * k, as Q4_1)
    integer_zero_point: bool = True
    #: "hadamard": the codes are of ``W @ H`` and the layer rotates its input by ``H``
    #: (``formats.rotation``); None: no rotation
    rotation: str | None = None
    #: symmetric only: each scale's sign puts its group's largest-magnitude weight on the
    #: format's longer, negative end (``scaling.qparams_from_range``; llama.cpp's Q4_0)
    signed_scale: bool = False

    def __post_init__(self) -> None:
        gran = Granularity.parse(self.granularity)
        object.__setattr__(self, "granularity", gran)
        check_rotation(self.rotation)
        fmt = get_format(self.format)  # raises with the list of valid names
        if not isinstance(self.format, str) and _registered(fmt):
            object.__setattr__(self, "format", fmt.name)  # equal specs compare equal
        if gran.kind == "token" or (gran.kind == "channel" and gran.axis not in (0, -2)):
            raise FormatError(
                f"weight granularity {gran} is not supported; use 'tensor', 'channel' (one "
                f"scale per output row) or 'group:N' (along the input dim)")
        if not self.symmetric and not fmt.supports_zero_point:
            raise FormatError(f"{fmt.name} has no zero-point, so it cannot be asymmetric: use "
                              f"symmetric=True")
        if self.symmetric and fmt.kind == "int" and fmt.min_value >= 0:
            raise FormatError(f"{fmt.name} is unsigned and cannot be symmetric around 0: use "
                              f"symmetric=False or the signed format")
        if self.scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"unknown scale dtype {self.scale_dtype!r}; use one of "
                              f"{list(SCALE_DTYPES)}")
        kind = super_scale(self.scale_dtype)
        if kind is not None:  # llama.cpp's k-quant scales (``formats.superblock``)
            check_super(kind, fmt, gran, self.symmetric, self.integer_zero_point)
        if self.signed_scale and (not self.symmetric or kind is not None
                                  or self.scale_dtype == "e8m0"):
            raise FormatError("signed_scale needs symmetric=True and a float scale dtype "
                              "(fp32, bf16 or fp16): drop signed_scale for this spec")

    @property
    def fmt(self) -> NumberFormat:
        return get_format(self.format)

    @property
    def group_size(self) -> int:
        """Inputs per group (0 unless the granularity is ``group:N``)."""
        return self.granularity.group_size

    def qparams(self, W: torch.Tensor) -> QParams:
        """Min/max (or absmax) parameters of ``W`` under this spec: the RTN choice."""
        return compute_qparams(W, self.fmt, self.granularity, **self.range_options())

    def range_options(self) -> dict:
        """This spec's keyword arguments of ``scaling.qparams_from_range``."""
        return dict(symmetric=self.symmetric, scale_dtype=self.scale_dtype,
                    integer_zero_point=self.integer_zero_point, signed_scale=self.signed_scale)

    def range_qparams(self, lo: torch.Tensor, hi: torch.Tensor,
                      granularity: Granularity | None = None) -> QParams:
        """Parameters mapping the range ``[lo, hi]`` onto this spec's grid."""
        return qparams_from_range(lo, hi, self.fmt, granularity or self.granularity,
                                  **self.range_options())

    def to_dict(self) -> dict:
        gran = self.granularity
        return {
            "format": self.fmt.name,
            "granularity": "channel" if gran.kind == "channel" and gran.axis == 0 else str(gran),
            "symmetric": self.symmetric,
            "scale_dtype": self.scale_dtype,
            "integer_zero_point": self.integer_zero_point,
            "rotation": self.rotation,
        } | ({"signed_scale": True} if self.signed_scale else {})


def _registered(fmt: NumberFormat) -> bool:
    try:
        return get_format(fmt.name) == fmt
    except FormatError:
        return False
