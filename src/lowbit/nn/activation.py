"""How a quantized module treats its input activations.

- ``None`` (weight-only): activations stay in the compute dtype;
- ``dynamic``: int8 scales computed per token at run time (no calibration);
- ``static``: one fixed scale (and zero-point) per tensor, estimated by an observer over
  calibration data before conversion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lowbit.errors import LowbitError

MODES = ("dynamic", "static")


class ModuleError(LowbitError, ValueError):
    """A module configuration or input that the nn layer cannot accept."""


@dataclass(frozen=True)
class ActivationSpec:
    mode: str = "dynamic"
    format: str = "int8"
    granularity: str = "token"
    symmetric: bool = True
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ModuleError(f"activation mode must be one of {MODES}, got {self.mode!r}")
        if self.format != "int8":
            raise ModuleError(
                f"activation format {self.format!r} has no integer kernel; lowbit quantizes "
                f"activations to int8 (use weight-only for other formats)"
            )
        if self.mode == "dynamic" and self.granularity != "token":
            raise ModuleError("dynamic activations are quantized per token: use granularity "
                              "'token' (or mode 'static' for a fixed per-tensor scale)")
        if self.mode == "static" and self.granularity != "tensor":
            raise ModuleError("static activations use one calibrated scale per tensor: use "
                              "granularity 'tensor'")

    def to_dict(self) -> dict:
        return asdict(self)
