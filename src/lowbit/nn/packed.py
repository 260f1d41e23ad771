"""A weight stored packed: codes in ``bits``-wide patterns plus its scale and zero-point.

This is lowbit's canonical storage (what ``save`` writes): ``qdata`` holds the codes of a
``[out_features, in_features]`` weight as ``fmt.to_bits`` patterns packed along the input
axis (``formats.packing``), ``scale``/``zero_point`` have the granularity's parameter shape.
Kernels may hold the same codes in their own layout in memory; they convert from and to
this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import (
    QParams,
    dequantize,
    get_format,
    pack,
    packed_size,
    unpack,
)
from lowbit.formats.spec import WeightSpec


@dataclass
class PackedWeight:
    """Canonical packed codes of a 2-D weight with their quantization parameters."""

    qdata: torch.Tensor  # uint8 [N, packed_size(K, bits)]
    qparams: QParams
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qdata.shape[0]

    @classmethod
    def from_codes(cls, codes: torch.Tensor, qparams: QParams) -> PackedWeight:
        fmt = qparams.format
        return cls(pack(fmt.to_bits(codes), fmt.bits), qparams, codes.shape[-1])

    def codes(self) -> torch.Tensor:
        fmt = self.qparams.format
        return fmt.from_bits(unpack(self.qdata, fmt.bits, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.qparams, dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qdata": self.qdata, "scale": self.qparams.scale}
        if self.qparams.zero_point is not None:
            out["zero_point"] = self.qparams.zero_point
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], spec: WeightSpec, in_features: int
    ) -> PackedWeight:
        fmt = get_format(spec.format)
        expected = packed_size(in_features, fmt.bits)
        if tensors["qdata"].shape[-1] != expected:
            raise ValueError(
                f"packed weight has {tensors['qdata'].shape[-1]} bytes per row, expected "
                f"{expected} for {in_features} {fmt.name} codes: the checkpoint is corrupt "
                f"or was written for another shape"
            )
        qparams = QParams(
            fmt, spec.granularity, tensors["scale"], tensors.get("zero_point"),
            spec.scale_dtype,
        )
        return cls(tensors["qdata"], qparams, in_features)
