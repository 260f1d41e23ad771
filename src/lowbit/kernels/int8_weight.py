"""Weight-only int8 linear: ``y = x @ (q * scale[:, None]).T + bias``.

Weights are int8 codes ``q`` ``[N, K]`` with one symmetric float scale per output channel
(``w = q * scale``, zero-point 0). The fast path is torch's CPU kernel
``torch.ops.aten._weight_int8pack_mm(x, q, scale)`` (aten/src/ATen/native/cpu/
int8mm_kernel.cpp): int8 weights are widened and scaled in registers, accumulation is in
float32. Facts about that kernel in torch 2.13 that shape this wrapper:

- Its AVX-512 path exists only for **bfloat16** activations: fed float32 (or float16) it
  runs a scalar loop about 20x slower than FP32 ``F.linear``. The wrapper casts ``x`` to
  bf16, runs the kernel and returns ``x``'s dtype. The kernel's ``scale`` must be bf16 too,
  which would round every channel's scale by up to 2^-8 (0.4%, the same error on every
  token): for float32/float16 ``x`` the wrapper passes unit scales and applies the float32
  ``scale`` in the op that casts the bf16 output back (``torch.mul``/``torch.addcmul``
  promote to float32), so only ``x`` and the output are rounded to bf16, at no extra op.
  bf16 ``x`` gets bf16 output from the kernel with the bf16 scale.
- It reads 16 activations at a time with *aligned* loads and no tail loop: ``K`` must be a
  multiple of 16 and the activation rows 32-byte aligned, or it returns garbage or
  segfaults. ``prepare_int8_weight`` zero-pads ``K`` up to a multiple of 16 (the padded
  activation columns are zeros); the wrapper copies a misaligned bf16 view.

For many rows (prefill) the kernel, a GEMV-style loop, is slower than a float GEMM
(3.4 ms vs 1.4 ms in bf16 at 512x576x1536 on an AVX-512 BF16 Xeon; 55 ms vs 6 ms in fp32 on
an AVX2 CPU without native bf16), so ``impl="auto"`` switches from ``PREFILL_ROWS`` rows on
to widening the codes (exact for int8) to the GEMM dtype measured fastest here
(``kernels.autotune``, ``prefill.int8_weight``) and ``F.linear``, with the float32 scale
applied after. Few rows run lowbit's C GEMV instead where it measured faster
(``decode.int8_weight``).

The reference path computes ``x @ (q * scale).T`` in float32 with ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.formats.rotation import rotate
from lowbit.kernels import choices, native
from lowbit.kernels._common import (
    KernelError,
    aligned_contiguous,
    check_bias,
    check_input,
    check_vector,
    check_weight,
    use_fast,
)

FAMILY = "int8_weight"
FAST = "int8_weight.int8pack_mm"
NATIVE = "int8_weight.native_avx2_gemv"
PREFILL = "int8_weight.widen_bf16_linear"
PREFILL_FP32 = "int8_weight.widen_fp32_linear"
REFERENCE = "int8_weight.reference"
#: from this many rows on, ``impl="auto"`` widens the codes to bf16 and runs the bf16 GEMM
#: (measured, 1 thread, 576x1536: 0.93 vs 0.65 ms at 32 rows, 0.45 vs 0.55 ms at 16)
PREFILL_ROWS = 32
_K_MULTIPLE = 16
_BF16 = torch.bfloat16
_INT8PACK_MM = torch.ops.aten._weight_int8pack_mm.default


@dataclass(frozen=True, slots=True)
class Int8WeightState:
    """Prepared weight-only int8 layer (plain tensors plus two ints).

    qdata: int8 ``[N, K_padded]``, contiguous, ``K`` zero-padded to a multiple of 16.
    kernel_scale: bfloat16 ``[N]``, the scale the kernel applies for bf16 ``x``.
    scale: float32 ``[N]``, the exact scale.
    unit_scale: bfloat16 ``[N]`` of ones, for float32 ``x`` (``scale`` applied after);
    derived, so it need not be saved.
    """

    qdata: torch.Tensor
    kernel_scale: torch.Tensor
    scale: torch.Tensor
    in_features: int
    out_features: int
    unit_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.unit_scale is None:
            ones = torch.ones(self.out_features, dtype=_BF16, device=self.qdata.device)
            object.__setattr__(self, "unit_scale", ones)

    @property
    def k_padding(self) -> int:
        return self.qdata.shape[1] - self.in_features


def prepare_int8_weight(qdata: torch.Tensor, scale: torch.Tensor) -> Int8WeightState:
    """Lay out int8 codes ``[N, K]`` and per-channel scales ``[N]`` for the int8 kernel.

    Cheap (a pad and a cast); call it again after loading saved codes and scales.
    """
    n, k = check_weight(qdata, torch.int8, FAMILY)
    scale32 = check_vector(scale, n, "scale", FAMILY)
    if not torch.isfinite(scale32).all():
        raise KernelError(f"{FAMILY}: scale contains NaN or Inf; fix the quantizer output")
    pad = (-k) % _K_MULTIPLE
    q = F.pad(qdata, (0, pad)) if pad else aligned_contiguous(qdata.detach())
    return Int8WeightState(
        qdata=q,
        kernel_scale=scale32.to(torch.bfloat16),
        scale=scale32,
        in_features=k,
        out_features=n,
    )


def dequantize_int8_weight(
    state: Int8WeightState, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float weight ``[N, K]`` the codes stand for: ``q * scale[:, None]``."""
    q = state.qdata[:, : state.in_features]
    return (q.float() * state.scale[:, None]).to(dtype)


def int8_weight_linear(
    x: torch.Tensor,
    state: Int8WeightState,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """``x @ (q * scale).T + bias`` for ``x`` of shape ``[..., K]``; returns ``x``'s dtype.

    impl: ``"fast"`` runs ``_weight_int8pack_mm`` on bf16 activations, ``"reference"``
    dequantizes and runs float32 ``F.linear``, ``"auto"`` picks, for CPU tensors that need
    no gradient, the kernel below ``PREFILL_ROWS`` rows and the widened bf16 GEMM from there
    on (see ``select_kernel``); the reference otherwise.
    """
    k = state.in_features
    if x.dim() == 0 or x.shape[-1] != k or not x.is_floating_point():
        check_input(x, k, FAMILY)
        raise KernelError(f"{FAMILY}: x must be floating point, got {x.dtype}; use x.float()")
    if bias is not None and bias.shape != (state.out_features,):
        check_bias(bias, state.out_features, FAMILY)
    if not use_fast(impl, x, FAMILY):
        return _reference(x, state, bias)
    flat = x.dim() != 2
    x2 = x.reshape(-1, k) if flat else x
    widen = impl == "auto" and x2.shape[0] >= PREFILL_ROWS
    pad = state.qdata.shape[1] - k
    if widen:  # int8 -> bf16/fp32 is exact; a float GEMM beats the kernel on many rows
        dtype = choices.float_dtype("prefill.int8_weight")
        x2 = x2.to(dtype)
        if pad:
            x2 = torch.constant_pad_nd(x2, (0, pad))
        y = F.linear(x2, state.qdata.to(dtype))
    elif native.preferred(FAMILY):  # few rows, where lowbit's AVX2 loop wins (autotune)
        y = native.int8_gemv(x2.float(), state.qdata, state.scale, bias, state.out_features)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y.view(*x.shape[:-1], state.out_features) if flat else y
    else:
        x2 = x2.to(_BF16)
        if pad:
            x2 = torch.constant_pad_nd(x2, (0, pad))
        else:  # .to keeps strides (and may return x itself): the kernel needs aligned rows
            x2 = aligned_contiguous(x2)
        if x.dtype is _BF16:
            y = _INT8PACK_MM(x2, state.qdata, state.kernel_scale)
            if bias is not None:
                y = torch.add(y, bias).to(_BF16)
            return y.view(*x.shape[:-1], state.out_features) if flat else y
        y = _INT8PACK_MM(x2, state.qdata, state.unit_scale)
    # the float32 scale (and bias) applied by the op that leaves bf16
    y = torch.mul(y, state.scale) if bias is None else torch.addcmul(bias, y, state.scale)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], state.out_features) if flat else y


def select_kernel(x: torch.Tensor, impl: str = "auto") -> str:
    """The ``lowbit.kernels.KERNELS`` key that ``int8_weight_linear(x, ..., impl)`` runs."""
    name = choices.select_by_rows(x, impl, FAMILY, PREFILL_ROWS,
                                  (FAST, PREFILL, PREFILL_FP32, REFERENCE))
    return NATIVE if name == FAST and native.preferred(FAMILY) else name


def _reference(
    x: torch.Tensor, state: Int8WeightState, bias: torch.Tensor | None
) -> torch.Tensor:
    w = dequantize_int8_weight(state).to(x.device)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w, b).to(x.dtype)


def decode_callable(state: Int8WeightState, bias: torch.Tensor | None,
                    factors: tuple[torch.Tensor, ...] = ()):
    """``f(x) == int8_weight_linear(x @ H, state, bias)`` for float32 ``x`` with the native
    decode kernel's pointers bound once (saves the per-call checks of a decode step), ``H``
    the Kronecker product of ``factors`` (none: ``H = I``) applied in the same call; None
    where the native kernel does not run."""
    if not native.preferred(FAMILY):
        return None

    def fallback(x):
        return int8_weight_linear(rotate(x) if factors else x, state, bias)

    return native.int8_decoder(state.qdata, state.scale, bias, state.out_features,
                               state.in_features, fallback, factors)


def merged_decode_callable(states: list[Int8WeightState], biases: list,
                           factors: tuple[torch.Tensor, ...] = ()):
    """One native call for layers that read the same input (q/k/v, gate/up): their codes
    and scales concatenated along N, so ``f(x)`` is ``[..., sum N]``, the layers' outputs
    side by side (the input rotated once first, as ``decode_callable``); None where the
    native kernel does not run or the inputs differ."""
    if not native.preferred(FAMILY) or len({s.qdata.shape[1] for s in states}) != 1:
        return None
    sizes = [s.out_features for s in states]
    bias = native.cat_bias(biases, sizes)

    def fallback(x):
        x = rotate(x) if factors else x
        return torch.cat([int8_weight_linear(x, s, b) for s, b in zip(states, biases,
                                                                        strict=True)], -1)

    return native.int8_decoder(torch.cat([s.qdata for s in states]),
                               torch.cat([s.scale for s in states]), bias, sum(sizes),
                               states[0].in_features, fallback, factors)
