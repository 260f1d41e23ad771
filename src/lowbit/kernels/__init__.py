"""CPU matmul kernels for quantized linear layers: thin wrappers over torch's own kernels.

Each family is a pair of pure functions, ``prepare_*`` (codes and scales -> a frozen state
of plain tensors, done once) and ``*_linear`` (one call per forward), with ``impl`` =
``"fast"`` (the torch CPU kernel), ``"reference"`` (plain float math the tests compare it
with) or ``"auto"`` (fast for CPU tensors that need no gradient). ``KERNELS`` names every
path so that a report can say which one ran; ``selected_kernel`` says which ``impl``
resolves to for a given input. Which fast path runs is measured once per machine on first
use (``autotune``, cached); nothing compiles or probes the CPU at import time.
"""

from __future__ import annotations

import torch

from lowbit.kernels import (
    autotune,
    cpu,
    int4_weight,
    int8_dynamic,
    int8_weight,
    integer_only,
    native,
    probe,
)
from lowbit.kernels._common import KernelError, use_fast
from lowbit.kernels.cpu import CpuFeatures, assume_cpu, cpu_features, fast_float_dtype
from lowbit.kernels.int4_weight import (
    Int4WeightState,
    dequantize_int4_weight,
    int4_weight_linear,
    prepare_int4_weight,
    relayout_int4_weight,
    unpack_int4_codes,
)
from lowbit.kernels.int8_dynamic import (
    Int8DynamicState,
    Int8StaticState,
    int8_dynamic_linear,
    int8_static_linear,
    prepare_int8_dynamic,
    prepare_int8_static,
    quantize_per_tensor,
    quantize_per_token,
)
from lowbit.kernels.int8_weight import (
    Int8WeightState,
    dequantize_int8_weight,
    int8_weight_linear,
    prepare_int8_weight,
)
from lowbit.kernels.integer_only import (
    IntegerLinearState,
    integer_linear,
    prepare_integer_linear,
    quantize_multiplier,
    quantize_multipliers,
    requantize,
    rounding_right_shift,
    saturating_rounding_doubling_high_mul,
)

# autotune measures through the probe without importing it (the probe runs the wrappers);
# looked up at call time, so a replaced ``probe.measure`` (tests) is the one that runs
autotune.register_kernel_probe(lambda: probe.measure())

KERNELS: dict[str, str] = {
    int8_weight.FAST: "int8 weight-only: aten._weight_int8pack_mm on bf16 activations, "
    "fp32 accumulate, per-channel scale",
    int8_weight.PREFILL: "int8 weight-only, many rows: codes widened to bf16 (exact), "
    "bf16 F.linear, fp32 per-channel scale after",
    int8_weight.PREFILL_FP32: "int8 weight-only, many rows, where fp32 measured faster: codes "
    "widened to fp32 (exact), fp32 F.linear, per-channel scale after",
    int8_weight.NATIVE: "int8 weight-only, few rows, where it measured faster: lowbit's AVX2 "
    "loop (kernels/csrc), int8 widened in registers, fp32 activations and accumulate",
    int8_weight.REFERENCE: "int8 weight-only: dequantize to fp32, then F.linear in fp32",
    int4_weight.FAST: "group-wise 4-bit (also 2/3-bit codes) weight-only: "
    "aten._weight_int4pack_mm_for_cpu on bf16 activations, fp32 accumulate",
    int4_weight.NATIVE: "group-wise 4-bit, few rows, where it measured faster: lowbit's AVX2 "
    "loop on the int4pack layout (kernels/csrc), fp32 activations and accumulate",
    int4_weight.PREFILL: "group-wise 4-bit, many rows: dequantize with the kernel's bf16 "
    "scale/zero, bf16 F.linear",
    int4_weight.PREFILL_FP32: "group-wise 4-bit, many rows, where fp32 measured faster: "
    "dequantize with the kernel's bf16 scale/zero to fp32, fp32 F.linear",
    int4_weight.REFERENCE: "group-wise 4-bit weight-only: dequantize (kernel's bf16 "
    "scale/zero) to fp32, then F.linear in fp32",
    int8_dynamic.FAST: "W8A8, per-token dynamic int8 activations: torch._int_mm "
    "int8 x int8 -> int32, float rescale",
    int8_dynamic.FLOAT: "W8A8, per-token dynamic int8 activations, where it measured faster: the "
    "same int8 codes through an fp32 GEMM (exact products), float rescale",
    int8_dynamic.STATIC_FLOAT: "W8A8 per-tensor static, where it measured faster: the same int8 "
    "codes through an fp32 GEMM (exact products), float rescale",
    int8_dynamic.NATIVE: "W8A8 per-token dynamic, few rows, where it measured faster: "
    "lowbit's AVX2 loop on the same int8 codes (exact products), float rescale",
    int8_dynamic.STATIC_NATIVE: "W8A8 per-tensor static, few rows, where it measured faster: "
    "lowbit's AVX2 loop on the same int8 codes (exact products), float rescale",
    int8_dynamic.REFERENCE: "W8A8 per-token dynamic: same int8 codes, exact float64 matmul",
    int8_dynamic.STATIC_FAST: "W8A8, calibrated per-tensor static int8 activations: "
    "torch._int_mm int8 x int8 -> int32, float rescale",
    int8_dynamic.STATIC_REFERENCE: "W8A8 per-tensor static: same int8 codes, exact float64 "
    "matmul",
    integer_only.FAST: "integer-only (Jacob et al. 2018): torch._int_mm int32 accumulate, "
    "int32 bias, fixed-point requantize to int8",
    integer_only.REFERENCE: "integer-only: exact float64 matmul, same integer requantize",
}

_FAMILIES = {
    "integer_only": (integer_only.FAST, integer_only.REFERENCE),
}


FAMILIES = ("int4_weight", "int8_dynamic", "int8_static", "int8_weight", "integer_only")


def selected_kernel(family: str, x: torch.Tensor, impl: str = "auto") -> str:
    """The ``KERNELS`` key that ``<family>_linear(x, ..., impl=impl)`` runs for this ``x``.

    family: ``int8_weight``, ``int4_weight``, ``int8_dynamic``, ``int8_static`` or
    ``integer_only``.
    """
    if family == "int8_weight":
        return int8_weight.select_kernel(x, impl)
    if family == "int4_weight":
        return int4_weight.select_kernel(x, impl)
    if family in ("int8_dynamic", "int8_static"):
        return int8_dynamic.select_kernel(family, x, impl)
    if family not in _FAMILIES:
        raise KernelError(
            f"unknown kernel family {family!r}; use one of {FAMILIES}"
        )
    fast, reference = _FAMILIES[family]
    return fast if use_fast(impl, x, family) else reference


__all__ = [
    "KERNELS",
    "CpuFeatures",
    "autotune",
    "assume_cpu",
    "cpu",
    "native",
    "cpu_features",
    "fast_float_dtype",
    "Int4WeightState",
    "Int8DynamicState",
    "Int8StaticState",
    "Int8WeightState",
    "IntegerLinearState",
    "KernelError",
    "dequantize_int4_weight",
    "dequantize_int8_weight",
    "int4_weight_linear",
    "int8_dynamic_linear",
    "int8_static_linear",
    "int8_weight_linear",
    "integer_linear",
    "prepare_int4_weight",
    "prepare_int8_dynamic",
    "prepare_int8_static",
    "prepare_int8_weight",
    "prepare_integer_linear",
    "quantize_multiplier",
    "quantize_multipliers",
    "quantize_per_tensor",
    "quantize_per_token",
    "relayout_int4_weight",
    "requantize",
    "rounding_right_shift",
    "saturating_rounding_doubling_high_mul",
    "selected_kernel",
    "unpack_int4_codes",
]
