"""Bytes and bits per weight, counting codes, scales, zero-points and codebooks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class SizeReport:
    model_bytes: int  # every parameter and buffer in memory, shared tensors once
    linear_bytes: int  # the Linear / QuantizedLinear weights with their parameters
    linear_weights: int  # number of weights in those layers
    quantized_layers: int

    @property
    def bits_per_weight(self) -> float:
        """Bits per linear weight, scales, zero-points and padding included."""
        return 8 * self.linear_bytes / self.linear_weights if self.linear_weights else 0.0

    def to_dict(self) -> dict:
        return {"bytes": self.model_bytes, "linear_bytes": self.linear_bytes,
                "linear_weights": self.linear_weights, "bits_per_weight": self.bits_per_weight,
                "quantized_layers": self.quantized_layers}


def model_size(model: nn.Module) -> SizeReport:
    from lowbit.nn import QuantizedConv2d, QuantizedLinear

    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    linear_bytes = weights = quantized = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            linear_bytes += m.weight_nbytes()
            weights += m.in_features * m.out_features
            quantized += 1
        elif isinstance(m, QuantizedConv2d):
            linear_bytes += m.weight_nbytes()
            weights += m.weight_numel() if hasattr(m, "weight_numel") else m.out_channels * (
                m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            quantized += 1
        elif isinstance(m, nn.Linear):
            linear_bytes += m.weight.numel() * m.weight.element_size()
            weights += m.weight.numel()
    return SizeReport(total, linear_bytes, weights, quantized)
