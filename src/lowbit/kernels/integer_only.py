"""Integer-only linear layer (Jacob et al., 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", section 2).

Every tensor is an integer: activations ``q_x`` (int8, zero-point ``Z_x``), weights ``q_w``
(int8, symmetric, one scale per output channel), bias ``q_b`` (int32 with scale
``S_x * S_w`` and zero-point 0, section 2.4), output ``q_y`` (int8, ``S_y``, ``Z_y``).
Eq. 4 with ``Z_w = 0`` reads

    q_y[m, n] = Z_y + M[n] * (q_b[n] + sum_k (q_x[m, k] - Z_x) * q_w[n, k])
              = Z_y + M[n] * (sum_k q_x q_w + (q_b[n] - Z_x * sum_k q_w[n, k]))

with the real multiplier ``M = S_x * S_w / S_y`` (eq. 5). The bracket's second term is a
per-channel constant folded at prepare time; the first runs on ``torch._int_mm`` (int8 x
int8 -> int32). ``M`` is represented as ``M = 2^-n * M0 / 2^31`` with ``M0`` an int32 in
``[2^30, 2^31)`` (eq. 6, "normalized" to ``[0.5, 1)``); applying it is gemmlowp's
``SaturatingRoundingDoublingHighMul`` (multiply by ``M0``, keep the rounded high 32 bits of
the doubled product) followed by ``RoundingDivideByPOT`` (a rounding right shift by ``n``,
ties away from zero), TFLite's ``MultiplyByQuantizedMultiplier``. Real multipliers >= 1
give ``n < 0``: a left shift before the multiply, as TFLite does.

The fast path and the reference path (the same integer math with an exact float64 matmul)
agree bit for bit; both stay within 1 LSB of the float computation
``round(M * (acc + q_b)) + Z_y``, which ``tests/kernels`` check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.kernels._common import KernelError, check_vector, check_weight, use_fast

FAMILY = "integer_only"
FAST = "integer_only.int_mm"
REFERENCE = "integer_only.reference"
_INT_MM = torch.ops.aten._int_mm.default
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``real = M0 * 2^-31 * 2^-shift`` with ``M0`` in ``[2^30, 2^31)`` (int32, Q31).

    Returns ``(M0, shift)``; ``shift`` is a right shift (negative: left shift). ``0.0``
    gives ``(0, 0)``; multipliers below ``2^-32`` (``shift > 31``) give ``(0, 0)`` as in
    TFLite's ``QuantizeMultiplier``.
    """
    if not math.isfinite(real) or real < 0:
        raise KernelError(f"{FAMILY}: the real multiplier must be finite and >= 0, got {real}")
    if real == 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2^exponent, mantissa in [0.5, 1)
    m0 = round(mantissa * (1 << 31))
    if m0 == 1 << 31:  # mantissa rounded up to 1.0
        m0 //= 2
        exponent += 1
    shift = -exponent
    if shift > 31:
        return 0, 0
    if shift < -31:
        raise KernelError(f"{FAMILY}: multiplier {real} is too large for int32 arithmetic")
    return m0, shift


def quantize_multipliers(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_multiplier`` for every element: ``(M0, shift)`` as int64 tensors."""
    real = real.detach().double()
    if not (torch.isfinite(real).all() and (real >= 0).all()):
        raise KernelError(f"{FAMILY}: real multipliers must be finite and >= 0")
    mantissa, exponent = torch.frexp(real)
    m0 = torch.round(mantissa * 2.0**31).to(torch.int64)
    carry = m0 == 1 << 31
    m0 = torch.where(carry, m0 // 2, m0)
    shift = -(exponent.to(torch.int64) + carry.to(torch.int64))
    if bool((shift < -31).any()):
        raise KernelError(f"{FAMILY}: a multiplier is too large for int32 arithmetic")
    dead = (real == 0) | (shift > 31)
    return m0.masked_fill(dead, 0), shift.masked_fill(dead, 0)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul`` for int32-range ``a`` and ``m0``:
    ``trunc((a * m0 + nudge) / 2^31)`` with ``nudge = 2^30`` or ``1 - 2^30`` by sign, which
    is ``floor(a * m0 / 2^31 + 1/2)`` (ties toward +inf), the form computed here in int64.
    The only overflow, ``a = m0 = -2^31``, saturates to ``2^31 - 1``."""
    out = _high_mul(a.to(torch.int64), m0)
    both_min = (a == _I32_MIN) & (m0 == _I32_MIN)
    return torch.where(both_min, _I32_MAX, out) if bool(both_min.any()) else out


def _high_mul(a: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_right_shift(torch.mul(a, m0).add_(1 << 30), 31)


def rounding_right_shift(x: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^shift`` rounded, ties away from zero.

    gemmlowp adds 1 to ``x >> shift`` when the remainder exceeds ``2^(shift-1) - 1``
    (``2^(shift-1)`` for negative ``x``); here the same as ``(x + nudge) >> shift`` with
    ``nudge = 2^(shift-1)``, minus 1 for negative ``x`` (0 when ``shift = 0``).
    """
    shift = torch.as_tensor(shift, dtype=torch.int64)
    pos, neg = _nudges(shift)
    return _rounding_right_shift(x, shift, pos, neg)


def _nudges(shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.bitwise_left_shift(torch.ones_like(shift), shift) >> 1  # 2^(shift-1) or 0
    return pos, pos - (shift > 0).to(torch.int64)


def _rounding_right_shift(x, shift, pos_nudge, neg_nudge) -> torch.Tensor:
    nudge = torch.where(x < 0, neg_nudge, pos_nudge)
    return torch.bitwise_right_shift(x + nudge, shift)


@dataclass(frozen=True, slots=True)
class _Requant:
    """``(M0, shift)`` per output channel, with everything the integer code derives from
    them precomputed (left/right shift split, rounding nudges). ``M0`` is never ``-2^31``
    here, so the high multiply cannot saturate."""

    m0: torch.Tensor
    left: torch.Tensor | None  # None when every multiplier is < 1
    right: torch.Tensor
    pos_nudge: torch.Tensor
    neg_nudge: torch.Tensor

    @classmethod
    def build(cls, m0: torch.Tensor, shift: torch.Tensor) -> _Requant:
        m0, shift = m0.to(torch.int64), torch.as_tensor(shift, dtype=torch.int64)
        if bool((m0 < 0).any()) or bool((m0 >= 1 << 31).any()):
            raise KernelError(f"{FAMILY}: M0 must lie in [0, 2^31), as quantize_multiplier "
                              f"returns it")
        left = (-shift).clamp(min=0)
        right = shift.clamp(min=0)
        pos, neg = _nudges(right)
        return cls(m0, left if bool((left > 0).any()) else None, right, pos, neg)

    def apply(self, acc: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
        x = acc.to(torch.int64).clamp_(_I32_MIN, _I32_MAX)
        if self.left is not None:  # multipliers >= 1: saturating left shift first
            x = torch.bitwise_left_shift(x, self.left).clamp_(_I32_MIN, _I32_MAX)
        x = _rounding_right_shift(_high_mul(x, self.m0), self.right, self.pos_nudge,
                                  self.neg_nudge)
        return x.add_(zero_point).clamp_(qmin, qmax).to(torch.int8)


def requantize(
    acc: torch.Tensor,
    m0: torch.Tensor,
    shift: torch.Tensor,
    zero_point: int,
    qmin: int = -128,
    qmax: int = 127,
) -> torch.Tensor:
    """int32 accumulators to int8: ``clamp(Z + M0 * acc / 2^(31 + shift), qmin, qmax)``.

    TFLite's ``MultiplyByQuantizedMultiplier`` plus the output zero-point. ``acc`` may be
    int64; it saturates to the int32 range first, as an int32 add would.
    """
    return _Requant.build(m0, shift).apply(acc, zero_point, qmin, qmax)


@dataclass(frozen=True, slots=True)
class IntegerLinearState:
    """qdata int8 ``[N, K]``; m0, shift int64 ``[N]``; folded_bias int64 ``[N]``
    (``q_b - Z_x * sum_k q_w``, within int32 range); plus the parameters it came from."""

    qdata: torch.Tensor
    folded_bias: torch.Tensor
    m0: torch.Tensor
    shift: torch.Tensor
    x_scale: float
    x_zero_point: int
    w_scale: torch.Tensor
    y_scale: float
    y_zero_point: int
    in_features: int
    out_features: int
    requant: _Requant


def prepare_integer_linear(
    qdata: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    x_scale: float,
    x_zero_point: int,
    y_scale: float,
    y_zero_point: int,
    bias: torch.Tensor | None = None,
) -> IntegerLinearState:
    """Fold zero-points and bias, and turn ``S_x * S_w / S_y`` into ``(M0, shift)``.

    ``w_scale`` is ``[N]`` (per channel) or one number; ``bias`` is the float bias, quantized
    here to int32 with scale ``S_x * S_w[n]`` (Jacob et al., 2018, section 2.4).
    """
    n, k = check_weight(qdata, torch.int8, FAMILY)
    if w_scale.numel() == 1:
        w_scale = w_scale.reshape(1).expand(n)
    w_scale = check_vector(w_scale, n, "w_scale", FAMILY).double()
    for name, v in (("x_scale", x_scale), ("y_scale", y_scale)):
        if not (math.isfinite(v) and v > 0):
            raise KernelError(f"{FAMILY}: {name} must be a positive finite number, got {v}")
    for name, z in (("x_zero_point", x_zero_point), ("y_zero_point", y_zero_point)):
        if int(z) != z or not -128 <= z <= 127:
            raise KernelError(f"{FAMILY}: {name} must be an integer in [-128, 127], got {z}")
    m0, shift = quantize_multipliers(x_scale * w_scale / y_scale)
    q_bias = torch.zeros(n, dtype=torch.int64)
    if bias is not None:
        if bias.shape != (n,):
            raise KernelError(f"{FAMILY}: bias must have shape [{n}], got {tuple(bias.shape)}")
        q_bias = torch.round(bias.detach().double() / (x_scale * w_scale)).to(torch.int64)
    folded = q_bias - int(x_zero_point) * qdata.to(torch.int64).sum(dim=1)
    if folded.abs().max() > _I32_MAX:
        raise KernelError(f"{FAMILY}: the folded bias overflows int32; check the bias and scales")
    return IntegerLinearState(
        qdata.detach().contiguous(), folded, m0, shift, float(x_scale), int(x_zero_point),
        w_scale.float(), float(y_scale), int(y_zero_point), k, n, _Requant.build(m0, shift),
    )


def integer_linear(
    x: torch.Tensor, state: IntegerLinearState, *, impl: str = "auto"
) -> torch.Tensor:
    """int8 codes ``[..., K]`` in, int8 codes ``[..., N]`` out (scale ``S_y``, ``Z_y``).

    impl: ``"fast"`` accumulates with ``torch._int_mm``; ``"reference"`` with an exact
    float64 matmul; the requantization is the same integer code in both.
    """
    k = state.in_features
    if x.dtype != torch.int8 or x.dim() == 0 or x.shape[-1] != k:
        raise KernelError(
            f"{FAMILY}: x must be int8 codes of shape [..., {k}], got {x.dtype} "
            f"{tuple(x.shape)} (uint8 codes with zero-point z: pass (x - 128) as int8 with "
            f"zero-point z - 128)"
        )
    x2 = x.reshape(-1, k)
    if use_fast(impl, x2, FAMILY):
        acc = _INT_MM(x2.contiguous(), state.qdata.T)
    else:
        acc = (x2.double() @ state.qdata.double().T).to(torch.int64)
    acc = torch.add(state.folded_bias, acc)  # int64: no silent int32 wrap-around
    y = state.requant.apply(acc, state.y_zero_point, -128, 127)
    return y.view(*x.shape[:-1], state.out_features)
