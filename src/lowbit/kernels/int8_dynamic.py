"""W8A8 linear: int8 activations times int8 weights with int32 accumulation.

Weights: int8 codes ``q_w`` ``[N, K]``, symmetric, one float scale per output channel.
Activations are quantized symmetrically to int8 on the fly,

- dynamic (per token, computed every call; as in LLM.int8()'s vector-wise quantization,
  Dettmers et al., 2022, without the outlier split): ``s_x[m] = max_k |x[m, k]| / 127``;
- static (one per-tensor scale ``s_x`` fixed by calibration, e.g. SmoothQuant's
  per-tensor static setting, Xiao et al., 2023): codes clamped to ``[-127, 127]``;

with ``q_x = round(x / s_x)`` (half to even), then

    y[m, n] = s_x[m] * s_w[n] * sum_k q_x[m, k] * q_w[n, k]  (+ bias[n])

The integer sum runs on whichever of three exact paths ``kernels.autotune`` measured fastest
here (``decode.w8a8`` for few rows, ``prefill.w8a8`` for many): ``torch._int_mm`` (int8 x
int8 -> int32; oneDNN/VNNI on x86), a float32 GEMM on the codes, or (few rows) lowbit's C
loop. Without VNNI (AVX2 only) ``_int_mm`` is a slow loop (197 ms vs 6 ms for FP32 at
512x576x1536), and oneDNN's and FBGEMM's u8 x s8 kernels saturate 16-bit pair sums unless
the activations lose a bit (FBGEMM's ``reduce_range``), hence the float32 GEMM: every
product ``q_x * q_w`` (|.| <= 127^2) and every partial sum below 2^24 is exact in float32, so
the result equals the int32 sum up to float32 rounding of sums beyond 2^24. Few rows
(decode) go through lowbit's AVX2 loop (``kernels.native``) on the same codes, with eight
float32 partial sums per row (each exact below 2^24). On
the CPU in torch 2.13 it accepts any ``M`` (the ``M > 16`` rule is CUDA's) and is exact
(tests check it against float64), so decode (``M = 1``) uses the same kernel; the weight
is passed as the transposed view of the ``[N, K]`` codes, which is also its fastest layout
(11 us vs 27 us for a contiguous ``[K, N]`` copy at 1x576x1536). The reference path uses
the same activation codes and does the matmul in float64, which is exact here (|sum| <
K * 2^14 < 2^53).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

FAMILY = "int8_dynamic"
FAST = "int8_dynamic.int_mm"
REFERENCE = "int8_dynamic.reference"
STATIC_FAST = "int8_static.int_mm"
STATIC_REFERENCE = "int8_static.reference"
FLOAT = "int8_dynamic.fp32_gemm"
STATIC_FLOAT = "int8_static.fp32_gemm"
NATIVE = "int8_dynamic.native_avx2_gemv"
STATIC_NATIVE = "int8_static.native_avx2_gemv"
QMAX = 127
_F32 = torch.float32
_INT8 = torch.int8
_INT_MM = torch.ops.aten._int_mm.default
_TINY = 1e-12  # floor for an all-zero token's scale (its codes are 0 either way)


@dataclass(frozen=True, slots=True)
class Int8DynamicState:
    """qdata: int8 ``[N, K]`` contiguous; scale: float32 ``[N]``."""

    qdata: torch.Tensor
    scale: torch.Tensor
    in_features: int
    out_features: int


@dataclass(frozen=True, slots=True)
class Int8StaticState:
    """As ``Int8DynamicState`` plus the calibrated activation scale ``act_scale`` (a float)
    and ``out_scale = act_scale * scale`` (float32 ``[N]``), precomputed."""

    qdata: torch.Tensor
    scale: torch.Tensor
    act_scale: float
    out_scale: torch.Tensor
    in_features: int
    out_features: int


def prepare_int8_dynamic(qdata: torch.Tensor, scale: torch.Tensor) -> Int8DynamicState:
    """Check and lay out int8 weight codes ``[N, K]`` and per-channel scales ``[N]``."""
    n, k = check_weight(qdata, _INT8, FAMILY)
    scale32 = check_vector(scale, n, "scale", FAMILY)
    if not torch.isfinite(scale32).all():
        raise KernelError(f"{FAMILY}: scale contains NaN or Inf; fix the quantizer output")
    return Int8DynamicState(aligned_contiguous(qdata.detach()), scale32, k, n)


def prepare_int8_static(
    qdata: torch.Tensor, scale: torch.Tensor, act_scale: float | torch.Tensor
) -> Int8StaticState:
    """As ``prepare_int8_dynamic`` with a fixed per-tensor activation scale."""
    base = prepare_int8_dynamic(qdata, scale)
    if isinstance(act_scale, torch.Tensor):
        if act_scale.numel() != 1:
            raise KernelError(
                f"int8_static: act_scale must be one number (per-tensor), got shape "
                f"{tuple(act_scale.shape)}; use the dynamic kernel for per-token scales"
            )
        act_scale = float(act_scale)
    act_scale = float(act_scale)
    if not act_scale > 0 or act_scale == float("inf"):
        raise KernelError(f"int8_static: act_scale must be a positive finite number, got "
                          f"{act_scale}; calibrate the activation range first")
    return Int8StaticState(
        base.qdata, base.scale, act_scale, base.scale * act_scale, base.in_features,
        base.out_features,
    )


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of ``x`` ``[M, K]``: ``(codes int8, scale [M, 1])``.

    ``scale = max|x| / 127`` (float32), ``codes = round(x / scale)``, which lies in
    ``[-127, 127]`` by construction.
    """
    x = x if x.dtype is _F32 else x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=_TINY).div_(QMAX)
    return torch.div(x, scale).round_().to(_INT8), scale


def quantize_per_tensor(x: torch.Tensor, act_scale: float) -> torch.Tensor:
    """Symmetric int8 codes ``clamp(round(x / act_scale), -127, 127)``."""
    x = x if x.dtype is _F32 else x.float()
    return torch.div(x, act_scale).round_().clamp_(-QMAX, QMAX).to(_INT8)


def _path(rows: int) -> str:
    """``native``, ``int_mm`` or ``fp32_gemm``: the integer matmul for ``rows`` rows."""
    if rows >= native.MAX_ROWS:
        return choices.choice("prefill.w8a8")
    if native.preferred("w8a8"):
        return "native"
    return choices.choice("decode.w8a8", skip=("native",))


def integer_matmul(codes: torch.Tensor, qdata: torch.Tensor) -> torch.Tensor:
    """``codes [M, K] @ qdata[N, K].T`` of int8 tensors: int32 from ``torch._int_mm``, or
    float32 from lowbit's loop or a float32 GEMM on the same codes (see above)."""
    path = _path(codes.shape[0])
    if path == "int_mm":
        return _INT_MM(codes, qdata.T)
    if path == "native":
        return native.int8_gemv(codes.to(_F32), qdata, None, None, qdata.shape[0])
    return torch.nn.functional.linear(codes.to(_F32), qdata.to(_F32))


def select_kernel(family: str, x: torch.Tensor, impl: str = "auto") -> str:
    """The ``lowbit.kernels.KERNELS`` key that ``int8_{dynamic,static}_linear`` runs."""
    static = family == "int8_static"
    if not use_fast(impl, x, family):
        return STATIC_REFERENCE if static else REFERENCE
    path = _path(x.numel() // max(x.shape[-1], 1) if x.dim() else 1)
    if path == "int_mm":
        return STATIC_FAST if static else FAST
    if path == "native":
        return STATIC_NATIVE if static else NATIVE
    return STATIC_FLOAT if static else FLOAT


def _check(x: torch.Tensor, state, bias: torch.Tensor | None, family: str) -> None:
    k = state.in_features
    if x.dim() == 0 or x.shape[-1] != k or not x.is_floating_point():
        check_input(x, k, family)
        raise KernelError(f"{family}: x must be floating point, got {x.dtype}; use x.float()")
    if bias is not None and bias.shape != (state.out_features,):
        check_bias(bias, state.out_features, family)


def int8_dynamic_linear(
    x: torch.Tensor,
    state: Int8DynamicState,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """W8A8 with per-token dynamic activation scales; ``x`` ``[..., K]``, returns its dtype.

    impl: ``"fast"`` = ``torch._int_mm``, ``"reference"`` = float64 matmul of the same codes,
    ``"auto"`` = fast for CPU tensors that need no gradient.
    """
    _check(x, state, bias, FAMILY)
    k = state.in_features
    flat = x.dim() != 2
    codes, x_scale = quantize_per_token(x.reshape(-1, k) if flat else x)
    if use_fast(impl, x, FAMILY):
        acc = integer_matmul(codes, state.qdata)
        y = torch.mul(acc, x_scale).mul_(state.scale)  # int32 * float32 -> float32
        if bias is not None:
            y.add_(bias)
    else:
        acc = codes.double() @ state.qdata.double().T
        y = (acc * x_scale.double() * state.scale.double()).float()
        if bias is not None:
            y += bias.float()
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], state.out_features) if flat else y


def int8_static_linear(
    x: torch.Tensor,
    state: Int8StaticState,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """W8A8 with the calibrated per-tensor activation scale ``state.act_scale``."""
    _check(x, state, bias, "int8_static")
    k = state.in_features
    flat = x.dim() != 2
    codes = quantize_per_tensor(x.reshape(-1, k) if flat else x, state.act_scale)
    if use_fast(impl, x, "int8_static"):
        acc = integer_matmul(codes, state.qdata)
        if bias is None:
            y = torch.mul(acc, state.out_scale)
        else:
            y = torch.addcmul(bias, acc, state.out_scale)
    else:
        acc = codes.double() @ state.qdata.double().T
        y = (acc * (state.scale.double() * state.act_scale)).float()
        if bias is not None:
            y += bias.float()
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], state.out_features) if flat else y


def activation_codes(x: torch.Tensor, factors: tuple[torch.Tensor, ...] = (),
                     act_scale: float = 0.0, *, rotation: tuple | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The int8 codes of ``x`` ``[M, K]`` rotated by the Kronecker product of ``factors``
    (none: ``H = I``) and their per-token scales ``[M, 1]`` (``act_scale`` 0), or the codes
    with the static ``act_scale`` (scales None): one C pass over the rows where the native
    library is available (the same codes as below for an unrotated input), else
    ``rotate`` and ``quantize_per_token`` / ``quantize_per_tensor``. ``rotation``: the
    factors already as ``native.factor_args`` (a caller that quantizes many times)."""
    x = x if x.dtype is _F32 else x.float()
    if native.available() and not torch.compiler.is_compiling():
        rotation = rotation if rotation is not None else native.factor_args(factors)
        codes, scales = native.w8a8_quantize_rows(x, rotation, act_scale)
        return codes, (None if act_scale else scales)
    x = rotate(x) if factors else x
    return (quantize_per_tensor(x, act_scale), None) if act_scale else quantize_per_token(x)


def group_prefill_callable(states: list, biases: list, factors: tuple[torch.Tensor, ...]):
    """``f(x) == [int8_{dynamic,static}_linear(x @ H, s, b) for s, b in ...]`` for layers
    that read the same input (q/k/v, gate/up; or one layer): the rotation and the activation
    codes once for the group (``activation_codes``), then one integer GEMM per layer. None
    when the layers' static activation scales differ (their codes would too)."""
    static = {isinstance(s, Int8StaticState) for s in states}
    if len(static) != 1:
        return None
    act_scale = 0.0
    if static.pop():
        if len({s.act_scale for s in states}) != 1:
            return None
        act_scale = states[0].act_scale
    rotation = native.factor_args(factors)

    def f(x: torch.Tensor) -> list[torch.Tensor]:
        fused = native.available() and not torch.compiler.is_compiling()
        flat = x.reshape(-1, x.shape[-1])
        codes, x_scale = activation_codes(flat, factors, act_scale, rotation=rotation)
        outs = []
        for state, bias in zip(states, biases, strict=True):
            acc = integer_matmul(codes, state.qdata)
            if bias is None and acc.dtype is torch.int32 and acc.is_contiguous() and fused:
                y = native.w8a8_dequant(acc, x_scale, state.scale if x_scale is not None
                                        else state.out_scale)
            elif x_scale is None:
                y = torch.mul(acc, state.out_scale) if bias is None else torch.addcmul(
                    bias, acc, state.out_scale)
            else:
                y = torch.mul(acc, x_scale).mul_(state.scale)
                if bias is not None:
                    y.add_(bias)
            outs.append(y.to(x.dtype).view(*x.shape[:-1], state.out_features))
        return outs

    return f


def decode_callable(state: Int8DynamicState | Int8StaticState, bias: torch.Tensor | None,
                    factors: tuple[torch.Tensor, ...] = ()):
    """``f(x) == int8_{dynamic,static}_linear(x @ H, state, bias)`` for float32 ``x``, with
    ``H`` the Kronecker product of ``factors`` (none: ``H = I``), as one native call: the
    rotation, the activation quantization, the int8 loop and the scaling; None where the
    native kernel does not run."""
    if not native.preferred("w8a8"):
        return None
    static = isinstance(state, Int8StaticState)
    linear = int8_static_linear if static else int8_dynamic_linear

    def fallback(x):
        return linear(rotate(x) if factors else x, state, bias)

    return native.w8a8_decoder(state.qdata, state.out_scale if static else state.scale, bias,
                               state.out_features, state.in_features,
                               state.act_scale if static else 0.0, factors, fallback)
