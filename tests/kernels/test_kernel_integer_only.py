"""Integer-only linear (Jacob et al. 2018): fixed-point multiplier, rounding shift, 1 LSB."""

import math

import pytest
import torch

from lowbit.kernels import (
    KernelError,
    integer_linear,
    prepare_integer_linear,
    quantize_multiplier,
    quantize_multipliers,
    requantize,
    rounding_right_shift,
    saturating_rounding_doubling_high_mul,
)


@pytest.mark.parametrize(
    "real,expected",
    [(0.5, (2**30, 0)), (0.25, (2**30, 1)), (1.0, (2**30, -1)), (0.75, (3 * 2**29, 0)),
     (0.0, (0, 0)), (2.0**-40, (0, 0))],
)
def test_quantize_multiplier_known_values(real, expected):
    assert quantize_multiplier(real) == expected


def test_quantize_multiplier_is_accurate_and_vectorized_agrees():
    g = torch.Generator().manual_seed(0)
    exponents = torch.rand(500, generator=g, dtype=torch.float64) * 10 - 9
    reals = torch.cat([10.0**exponents,  # log-uniform in [1e-9, 10)
                       torch.tensor([1 - 2**-40, 0.999999999, 3.7], dtype=torch.float64)])
    m0s, shifts = quantize_multipliers(reals)
    for r, m0, shift in zip(reals.tolist(), m0s.tolist(), shifts.tolist(), strict=True):
        assert (m0, shift) == quantize_multiplier(r)
        assert 2**30 <= m0 < 2**31
        assert abs(m0 * 2.0 ** (-31 - shift) - r) <= r * 2**-31


def test_rounding_right_shift_ties_away_from_zero():
    x = torch.tensor([5, -5, 6, -6, 7, -7, 4, -4], dtype=torch.int64)
    assert rounding_right_shift(x, 1).tolist() == [3, -3, 3, -3, 4, -4, 2, -2]
    assert rounding_right_shift(x, 0).tolist() == x.tolist()
    for s in (0, 1, 5, 30):
        assert rounding_right_shift(x, s).tolist() == [
            _gemmlowp_divide_by_pot(v, s) for v in x.tolist()]
    y = torch.randint(-(2**31), 2**31, (2000,), dtype=torch.int64,
                      generator=torch.Generator().manual_seed(1))
    for s in (1, 3, 17, 31):
        exact = torch.tensor([math.copysign(math.floor(abs(v) / 2**s + 0.5), v)
                              for v in y.tolist()], dtype=torch.int64)
        assert torch.equal(rounding_right_shift(y, s), exact)


def _gemmlowp_high_mul(a: int, b: int) -> int:
    """gemmlowp's SaturatingRoundingDoublingHighMul, transcribed with Python integers."""
    if a == b == -(2**31):
        return 2**31 - 1
    ab = a * b
    nudge = 1 << 30 if ab >= 0 else 1 - (1 << 30)
    n = ab + nudge
    return abs(n) // 2**31 * (1 if n >= 0 else -1)  # C division truncates toward zero


def _gemmlowp_divide_by_pot(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def test_high_mul_matches_gemmlowp():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-(2**31), 2**31, (3000,), dtype=torch.int64, generator=g)
    a[:4] = torch.tensor([-(2**31), 2**31 - 1, -(2**30), 2**30])
    m0 = torch.randint(-(2**31), 2**31, (3000,), dtype=torch.int64, generator=g)
    m0[:4] = torch.tensor([-(2**31), 2**31 - 1, 1, 1])
    out = saturating_rounding_doubling_high_mul(a, m0)
    expected = [_gemmlowp_high_mul(x, y) for x, y in zip(a.tolist(), m0.tolist(), strict=True)]
    assert out.tolist() == expected
    ties = saturating_rounding_doubling_high_mul(torch.tensor([-(2**30), 2**30]), torch.tensor(1))
    assert ties.tolist() == [0, 1]  # ties go toward +inf: -0.5 -> 0, 0.5 -> 1


def test_requantize_is_bit_exact_with_gemmlowp():
    g = torch.Generator().manual_seed(5)
    acc = torch.randint(-(2**31), 2**31, (40, 25), dtype=torch.int64, generator=g)
    real = 10.0 ** (torch.rand(25, generator=g, dtype=torch.float64) * 8 - 9)
    m0, shift = quantize_multipliers(real)
    out = requantize(acc, m0, shift, zero_point=7)
    for i, j in [(i, j) for i in range(40) for j in range(25)]:
        x = _gemmlowp_high_mul(int(acc[i, j]), int(m0[j]))
        ref = max(-128, min(127, _gemmlowp_divide_by_pot(x, int(shift[j])) + 7))
        assert int(out[i, j]) == ref


def test_requantize_within_one_lsb_of_float():
    g = torch.Generator().manual_seed(3)
    acc = torch.randint(-(2**24), 2**24, (64, 32), dtype=torch.int64, generator=g)
    real = torch.rand(32, generator=g, dtype=torch.float64) * 1e-5
    m0, shift = quantize_multipliers(real)
    out = requantize(acc, m0, shift, zero_point=-3)
    ref = (torch.round(acc.double() * real) - 3).clamp(-128, 127)
    assert (out.double() - ref).abs().max() <= 1


def _layer(m, k, n, seed=0, y_scale=None):
    g = torch.Generator().manual_seed(seed)
    x_real = torch.rand(m, k, generator=g) * 4 - 1  # asymmetric range [-1, 3]
    x_scale, x_zp = 4 / 255, -128 + 64  # zero at code -64
    qx = torch.clamp(torch.round(x_real / x_scale) + x_zp, -128, 127).to(torch.int8)
    w = torch.randn(n, k, generator=g) * 0.05
    w_scale = w.abs().amax(dim=1) / 127
    qw = torch.round(w / w_scale[:, None]).to(torch.int8)
    bias = torch.randn(n, generator=g) * 0.1
    xd = (qx.double() - x_zp) * x_scale
    y_real = xd @ (qw.double() * w_scale.double()[:, None]).T + bias.double()
    if y_scale is None:
        y_scale = float(y_real.abs().max()) / 127
    state = prepare_integer_linear(qw, w_scale, x_scale=x_scale, x_zero_point=x_zp,
                                   y_scale=y_scale, y_zero_point=5, bias=bias)
    float_ref = torch.clamp(torch.round(y_real / y_scale) + 5, -128, 127)
    return qx, state, float_ref


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (512, 576, 1536), (1, 1536, 576), (3, 37, 5)])
def test_fast_is_bit_exact_with_reference_and_within_one_lsb_of_float(m, k, n):
    qx, state, float_ref = _layer(m, k, n)
    fast = integer_linear(qx, state, impl="fast")
    ref = integer_linear(qx, state, impl="reference")
    assert fast.dtype == torch.int8 and fast.shape == (m, n)
    assert torch.equal(fast, ref)
    assert (fast.double() - float_ref).abs().max() <= 1


def test_multiplier_above_one_uses_a_left_shift():
    g = torch.Generator().manual_seed(4)
    acc = torch.randint(-3, 4, (64, 32), dtype=torch.int64, generator=g)
    real = 1 + torch.rand(32, generator=g, dtype=torch.float64) * 39  # in [1, 40)
    m0, shift = quantize_multipliers(real)
    assert (shift < 0).all()
    ref = torch.round(acc.double() * real).clamp(-128, 127)
    assert (requantize(acc, m0, shift, zero_point=0).double() - ref).abs().max() <= 1
    qx, state, float_ref = _layer(4, 64, 16, y_scale=1e-6)  # M = S_x S_w / S_y > 1
    assert (state.shift < 0).all()
    out = integer_linear(qx, state)
    assert (out.double() - float_ref).abs().max() <= 1  # mostly saturated at -128 / 127


def test_shapes_and_errors():
    qx, state, _ = _layer(6, 32, 8)
    assert integer_linear(qx.view(2, 3, 32), state).shape == (2, 3, 8)
    with pytest.raises(KernelError, match="int8 codes"):
        integer_linear(qx.float(), state)
    with pytest.raises(KernelError, match="int8 codes"):
        integer_linear(qx[:, :31], state)
    with pytest.raises(KernelError, match="zero_point"):
        prepare_integer_linear(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2),
                               x_scale=1.0, x_zero_point=200, y_scale=1.0, y_zero_point=0)
    with pytest.raises(KernelError, match="finite"):
        quantize_multiplier(float("inf"))
