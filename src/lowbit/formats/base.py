"""The contract every number format follows, and the registry of formats by name.

A format is a small immutable description plus pure tensor functions. It works in its own
units: ``encode`` takes values that were already divided by a scale (see ``scaling``) and
returns *codes*; ``decode`` turns codes back into float32 values on the format's grid.

Codes are what gets stored:
- integer formats: the integer value itself (int8 for signed, uint8 for unsigned widths);
- float formats: the raw bit pattern (uint8 up to 8 bits, int16 for FP16/BF16);
- lookup formats (NF4, codebooks): the index into the codebook (uint8).
``to_bits``/``from_bits`` map codes to the unsigned ``bits``-wide patterns that ``packing``
packs into bytes, and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.errors import LowbitError

ROUNDING_MODES = ("nearest", "stochastic")


class FormatError(LowbitError, ValueError):
    """A format name, bit width or input that the format layer cannot accept."""


@dataclass(frozen=True)
class NumberFormat:
    """Base class: subclasses are frozen dataclasses that read like a ``torch.dtype``."""

    name: str
    bits: int

    kind: ClassVar[str] = "abstract"
    #: True where ``scaling`` may pair the format with an integer zero-point.
    supports_zero_point: ClassVar[bool] = False

    # -- facts -------------------------------------------------------------------------
    @property
    def max_value(self) -> float:
        raise NotImplementedError

    @property
    def min_value(self) -> float:
        raise NotImplementedError

    @property
    def smallest_normal(self) -> float:
        """Smallest positive normal value (for integers: 1, the smallest step)."""
        raise NotImplementedError

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value of any kind (equals ``smallest_normal`` without subnormals)."""
        raise NotImplementedError

    @property
    def levels(self) -> int:
        """Number of distinct finite values the format can represent."""
        raise NotImplementedError

    @property
    def code_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def grid(self) -> torch.Tensor:
        """All distinct finite values, sorted ascending (float64)."""
        raise NotImplementedError

    # -- pure functions ----------------------------------------------------------------
    def encode(
        self,
        y: torch.Tensor,
        rounding: str = "nearest",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Round ``y`` (already in the format's units) to the grid and return codes."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes back to float32 values."""
        raise NotImplementedError

    def round(self, y: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
        """Values of ``y`` rounded onto the grid (``decode(encode(y))``)."""
        return self.decode(self.encode(y, rounding))

    def to_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as unsigned ``bits``-wide patterns in uint8 (for packing)."""
        return codes.to(torch.uint8)

    def from_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_bits``."""
        return bits.to(self.code_dtype)

    def describe(self) -> dict:
        """One row of ``lowbit formats``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "bits": self.bits,
            "min": self.min_value,
            "max": self.max_value,
            "levels": self.levels,
            "smallest_normal": self.smallest_normal,
            "smallest_subnormal": self.smallest_subnormal,
        }

    def __str__(self) -> str:
        return self.name


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING_MODES:
        raise FormatError(f"unknown rounding {rounding!r}; use one of {ROUNDING_MODES}")


def check_float_input(y: torch.Tensor, what: str = "input") -> None:
    if not isinstance(y, torch.Tensor):
        raise FormatError(f"{what} must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise FormatError(
            f"{what} has dtype {y.dtype}; quantization needs a floating-point tensor "
            f"(convert with x.float())"
        )


def grid_encode(
    y: torch.Tensor,
    grid: torch.Tensor,
    rounding: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Index of the grid point chosen for each element of ``y`` (int64).

    Nearest rounding breaks ties toward the even index (for float grids ordered by value
    that is the code with an even mantissa when the grid has no gaps in codes). Values
    beyond the ends saturate. Stochastic rounding picks the upper neighbour with
    probability proportional to the distance from the lower one (unbiased in range).
    """
    check_rounding(rounding)
    g = grid.to(device=y.device, dtype=torch.float64)
    flat = y.detach().to(torch.float64).reshape(-1)
    upper = torch.searchsorted(g, flat).clamp(1, g.numel() - 1)
    lower = upper - 1
    lo, hi = g[lower], g[upper]
    span = hi - lo
    frac = ((flat - lo) / span).clamp(0.0, 1.0)
    if rounding == "nearest":
        pick_upper = (frac > 0.5) | ((frac == 0.5) & (upper % 2 == 0))
    else:
        rand = torch.rand(flat.shape, generator=generator, dtype=torch.float64, device=y.device)
        pick_upper = rand < frac
    return torch.where(pick_upper, upper, lower).reshape(y.shape)


_REGISTRY: dict[str, NumberFormat] = {}
_ALIASES: dict[str, str] = {}


def register_format(fmt: NumberFormat, *aliases: str) -> NumberFormat:
    """Make ``fmt`` available to ``get_format`` under its name and aliases."""
    _REGISTRY[fmt.name] = fmt
    for alias in aliases:
        _ALIASES[alias] = fmt.name
    return fmt


def get_format(name: str | NumberFormat) -> NumberFormat:
    """The format called ``name`` (case-insensitive); the error lists valid names."""
    if isinstance(name, NumberFormat):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    raise FormatError(
        f"unknown format {name!r}; valid formats: {', '.join(sorted(_REGISTRY))}"
        + (f" (aliases: {', '.join(sorted(_ALIASES))})" if _ALIASES else "")
    )


def list_formats() -> list[NumberFormat]:
    """Every registered format, in registration order."""
    return list(_REGISTRY.values())
