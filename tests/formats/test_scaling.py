"""Scale / zero-point math: worked example, properties, granularities, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import (
    FormatError,
    Granularity,
    compute_qparams,
    dequantize,
    fake_quantize,
    get_format,
    quantize,
    quantize_tensor,
    sqnr_db,
)

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=1, max_size=64)


def test_worked_example_int8_absmax():
    x = torch.tensor([-0.5, 0.3, 1.2, -2.1])
    codes, qp = quantize_tensor(x, "int8")
    assert qp.scale.item() == pytest.approx(2.1 / 127, rel=1e-6)
    assert codes.tolist() == [-30, 18, 73, -127]
    assert codes.dtype == torch.int8


@settings(max_examples=200, deadline=None)
@given(vectors, st.integers(2, 8), st.booleans())
def test_error_within_half_scale(values, bits, symmetric):
    x = torch.tensor(values)
    fmt = f"int{bits}" if symmetric else f"uint{bits}"
    codes, qp = quantize_tensor(x, fmt, symmetric=symmetric)
    err = (dequantize(codes, qp) - x).abs().max().item()
    assert err <= qp.scale.item() / 2 * (1 + 1e-5) + 1e-6


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-127, 127), min_size=1, max_size=50))
def test_integers_in_range_survive_exactly(ints):
    x = torch.tensor(ints, dtype=torch.float32)
    qp = compute_qparams(torch.tensor([127.0, -127.0]), "int8")  # scale exactly 1
    assert torch.equal(dequantize(quantize(x, qp), qp), x)


@settings(max_examples=200, deadline=None)
@given(vectors, st.integers(2, 8))
def test_asymmetric_represents_zero_exactly(values, bits):
    x = torch.tensor(values + [0.0])
    codes, qp = quantize_tensor(x, f"uint{bits}", symmetric=False)
    assert dequantize(codes, qp)[-1].item() == 0.0


def test_sqnr_rises_about_6db_per_bit():
    torch.manual_seed(0)
    x = torch.randn(256, 1024)
    sqnr = {}
    for bits in range(4, 9):
        codes, qp = quantize_tensor(x, f"int{bits}", "channel")
        sqnr[bits] = sqnr_db(x, dequantize(codes, qp))
    steps = [sqnr[b + 1] - sqnr[b] for b in range(4, 8)]
    # signed absmax uses 2^(b-1)-1 levels per side: 7 -> 15 is a 2.14x finer step (6.6 dB)
    assert all(5.8 < s < 6.8 for s in steps), steps
    assert 5.9 < sum(steps) / len(steps) < 6.5


@pytest.mark.parametrize("gran,shape", [
    ("tensor", ()), ("channel", (8,)), ("channel:1", (576,)), ("token", (8,)),
    ("group:128", (8, 5)), ("group:32", (8, 18)),
])
def test_param_shapes(gran, shape):
    w = torch.randn(8, 576)
    qp = compute_qparams(w, "int4", gran)
    assert tuple(qp.scale.shape) == shape


def test_partial_last_group_uses_its_own_elements():
    w = torch.ones(2, 576)
    w[:, 512:] = 100.0  # the 64-element last group only
    qp = compute_qparams(w, "int8", "group:128")
    assert qp.scale[:, :4].allclose(torch.tensor(1 / 127))
    assert qp.scale[:, 4].allclose(torch.tensor(100 / 127))
    codes = quantize(w, qp)
    assert codes.shape == w.shape
    assert torch.allclose(dequantize(codes, qp), w)


def test_per_group_beats_per_tensor_on_outliers():
    torch.manual_seed(0)
    w = torch.randn(64, 576)
    w[0, 3] = 50
    errs = {}
    for gran in ("tensor", "channel", "group:64"):
        c, qp = quantize_tensor(w, "int4", gran)
        errs[gran] = sqnr_db(w, dequantize(c, qp))
    assert errs["group:64"] > errs["channel"] > errs["tensor"]


@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16", "e8m0"])
def test_scale_dtypes(scale_dtype):
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    c, qp = quantize_tensor(w, "int8", "channel", scale_dtype=scale_dtype)
    assert sqnr_db(w, dequantize(c, qp)) > 35
    if scale_dtype == "e8m0":
        exps = torch.log2(qp.scale)
        assert torch.equal(exps, exps.round())
    else:
        assert qp.scale.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[scale_dtype]


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 0.3)
    qp = compute_qparams(torch.tensor([-127.0, 127.0]), "int8")
    gen = torch.Generator().manual_seed(0)
    q = dequantize(quantize(x, qp, rounding="stochastic", generator=gen), qp)
    assert set(q.unique().tolist()) == {0.0, 1.0}
    assert abs(q.mean().item() - 0.3) < 0.01


def test_fake_quantize_straight_through():
    x = torch.tensor([-3.0, -0.4, 0.2, 0.9, 5.0], requires_grad=True)
    qp = compute_qparams(torch.tensor([-1.0, 1.0]), "int4")
    y = fake_quantize(x, qp)
    assert torch.allclose(y.detach(), dequantize(quantize(x.detach(), qp), qp))
    y.sum().backward()
    # gradient passes inside the range, stops where the value clipped
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_zero_tensor_has_usable_scale():
    codes, qp = quantize_tensor(torch.zeros(4, 8), "int8", "channel")
    assert torch.isfinite(qp.scale).all() and (qp.scale > 0).all()
    assert torch.equal(dequantize(codes, qp), torch.zeros(4, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_refused(bad):
    with pytest.raises(FormatError, match="NaN or Inf"):
        compute_qparams(torch.tensor([1.0, bad]), "int8")


def test_empty_tensor_is_refused():
    with pytest.raises(FormatError, match="empty"):
        compute_qparams(torch.zeros(0), "int8")


def test_integer_tensor_is_refused():
    with pytest.raises(FormatError, match="floating-point"):
        compute_qparams(torch.arange(5), "int8")


def test_unsigned_symmetric_is_refused():
    with pytest.raises(FormatError, match="symmetric=False"):
        compute_qparams(torch.randn(5), "uint8", symmetric=True)


def test_bad_granularity_names():
    with pytest.raises(FormatError, match="group:N"):
        Granularity.parse("rows")
    with pytest.raises(FormatError, match="size"):
        Granularity.parse("group")


def test_unknown_format_lists_valid_names():
    with pytest.raises(FormatError, match="int8"):
        get_format("int9")


def test_channel_axis_out_of_range():
    with pytest.raises(FormatError, match="out of range"):
        compute_qparams(torch.randn(4, 4), "int8", Granularity.per_channel(3))


def test_large_values_do_not_overflow_half_scale():
    x = torch.tensor([1e30, -1e30])
    c, qp = quantize_tensor(x, "int8", scale_dtype="fp16")
    assert math.isfinite(qp.scale.float().item())


def test_float_zero_point_hits_the_range_ends_exactly():
    # a Q4_1-style grid (min + scale * k, min not a multiple of scale) is reproduced exactly
    grid = -0.37 + 0.11 * torch.arange(16, dtype=torch.float32)
    x = grid[torch.randint(0, 16, (64,), generator=torch.Generator().manual_seed(0))]
    x[:2] = grid[torch.tensor([0, 15])]
    codes, qp = quantize_tensor(x, "uint4", symmetric=False)
    exact = compute_qparams(x, "uint4", symmetric=False, integer_zero_point=False)
    assert qp.zero_point.dtype == torch.uint8 and exact.zero_point.dtype == torch.float32
    assert torch.allclose(dequantize(quantize(x, exact), exact), x, atol=1e-6)
    assert not torch.allclose(dequantize(codes, qp), x, atol=1e-3)


def test_float_zero_point_is_float16_beside_16_bit_scales():
    """2 bytes per group: a <= 4-bit zero-point lies in [0, 15], where float16 is within
    2^-8 of a step; beside fp32 scales, or for 8-bit codes, it stays float32."""
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    g64 = Granularity.parse("group:64")
    half = compute_qparams(x, "uint4", g64, symmetric=False, scale_dtype="bf16",
                           integer_zero_point=False)
    full = compute_qparams(x, "uint4", g64, symmetric=False, integer_zero_point=False)
    wide = compute_qparams(x, "uint8", g64, symmetric=False, scale_dtype="bf16",
                           integer_zero_point=False)
    assert half.zero_point.dtype == torch.float16
    assert full.zero_point.dtype == wide.zero_point.dtype == torch.float32
    lo = x.reshape(8, 4, 64).amin(-1).clamp(max=0)
    exact = -lo / half.scale.float()  # qmin - lo / scale, unrounded
    assert (half.zero_point.float() - exact).abs().max() <= 2 ** -8
    err = (dequantize(quantize(x, half), half) - x).abs().max(-1).values
    step = half.scale.float().amax(-1)
    assert bool((err <= 0.5 * step + 1e-6).all())  # still within half a step


def test_signed_scale_puts_the_extreme_on_the_longer_end():
    """``signed_scale`` (llama.cpp's Q4_0: d = max / -8): a group whose largest magnitude is
    positive gets a negative scale, so that value is code -8 exactly; the grid then has one
    more step across the group's range, and rounding error falls accordingly."""
    from lowbit.formats import WeightSpec

    w = torch.tensor([[0.1, -0.3, 0.8, 0.2], [-0.8, 0.5, 0.1, 0.0]])
    spec = WeightSpec("int4", "group:4", True, "fp16", signed_scale=True)
    qp = spec.qparams(w)
    assert qp.scale.flatten().tolist() == pytest.approx([-0.1, 0.1], rel=1e-3)
    codes = quantize(w, qp)
    assert codes[0, 2] == -8 and codes[1, 0] == -8
    assert torch.allclose(dequantize(codes, qp), w, atol=0.05 + 1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=g)
    errors = {}
    for signed in (False, True):
        s = WeightSpec("int4", "group:32", True, "fp16", signed_scale=signed)
        errors[signed] = float((dequantize(quantize(x, s.qparams(x)), s.qparams(x)) - x)
                               .pow(2).mean())
    assert errors[True] < 0.85 * errors[False], errors  # about 22% less on Gaussian weights
    assert WeightSpec(**spec.to_dict()) == spec
    assert "signed_scale" not in WeightSpec("int4", "group:4", True, "fp16").to_dict()
    with pytest.raises(FormatError, match="signed_scale needs symmetric"):
        WeightSpec("uint4", "group:32", False, "fp16", signed_scale=True)
