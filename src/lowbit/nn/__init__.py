"""Layer 3: quantized modules that hold packed weights and run CPU kernels."""

from lowbit.nn.activation import ActivationSpec, ModuleError
from lowbit.nn.backends import BACKENDS, select_backend
from lowbit.nn.conv import QuantizedConv2d
from lowbit.nn.fake_quant import (
    FakeQuantConv2d,
    FakeQuantError,
    FakeQuantizer,
    FakeQuantLinear,
    QuantizerSpec,
)
from lowbit.nn.linear import QuantizedLinear
from lowbit.nn.packed import PackedWeight, WeightSpec

__all__ = [
    "BACKENDS",
    "ActivationSpec",
    "FakeQuantConv2d",
    "FakeQuantError",
    "FakeQuantLinear",
    "FakeQuantizer",
    "QuantizedConv2d",
    "QuantizerSpec",
    "ModuleError",
    "PackedWeight",
    "QuantizedLinear",
    "WeightSpec",
    "select_backend",
]
