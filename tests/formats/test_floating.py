"""Float formats: FP8 bit-exact against torch, FP16/BF16 casts, FP6/FP4 facts, rounding."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FormatError, get_format
from lowbit.formats.floating import FP8_E4M3, FP8_E5M2, FloatFormat
from lowbit.formats.packing import pack, unpack

FP8 = [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]
HALF = [("fp16", torch.float16), ("bf16", torch.bfloat16)]
TORCH_BACKED = FP8 + HALF
SMALL = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN, and +0/-0 told apart."""
    bits_a = torch.nan_to_num(a, nan=0.0).view(torch.int32)
    bits_b = torch.nan_to_num(b, nan=0.0).view(torch.int32)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(bits_a, bits_b)


def wide_values(fmt, n=200_000, seed=0) -> torch.Tensor:
    """Random float32 values over the whole range of ``fmt`` (subnormals included), plus
    every grid value, every midpoint between neighbours (ties) and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log2(fmt.smallest_subnormal) - 2, math.log2(fmt.max_value)
    mag = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    grid = fmt.grid()
    mids = (grid[:-1] + grid[1:]) / 2
    x = torch.cat([mag * sign, grid, mids, -mids, torch.tensor([0.0, -0.0]).double()])
    return x.float().clamp(-fmt.max_value, fmt.max_value)


@pytest.mark.parametrize("name,dtype", FP8)
def test_fp8_decode_all_256_codes_bit_exact(name, dtype):
    fmt = get_format(name)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert same(fmt.decode(codes), codes.view(dtype).float())
    assert same(fmt.decode(codes.long()), codes.view(dtype).float())  # table path


@pytest.mark.parametrize("name,dtype", TORCH_BACKED)
def test_encode_equals_torch_cast_in_range(name, dtype):
    fmt = get_format(name)
    x = wide_values(fmt)
    expected = x.to(dtype).view(fmt.code_dtype)
    assert torch.equal(fmt.encode(x), expected)
    # the float32 emulation (used for stochastic rounding and dtype-less formats) agrees
    assert torch.equal(fmt._encode_emulated(x, "nearest", None), expected)


@pytest.mark.parametrize("name,dtype", HALF)
def test_half_round_trip_all_codes(name, dtype):
    fmt = get_format(name)
    codes = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = fmt.decode(codes)
    assert same(values, codes.view(dtype).float())
    assert same(fmt.decode(codes.long()), values)  # table path
    finite = torch.isfinite(values)
    assert torch.equal(fmt.encode(values[finite]), codes[finite])
    assert torch.equal(fmt.from_bits(fmt.to_bits(codes)), codes)
    assert int(fmt.to_bits(codes).min()) == 0 and int(fmt.to_bits(codes).max()) == 2**16 - 1


def test_out_of_range_saturates_unlike_torch_e5m2():
    big = torch.tensor([1e6, -1e6, math.inf, -math.inf, 60000.0])
    assert FP8_E5M2.decode(FP8_E5M2.encode(big)).tolist() == [57344.0, -57344.0] * 2 + [57344.0]
    assert torch.isinf(big.to(torch.float8_e5m2).float()[:4]).all()  # torch overflows
    assert FP8_E4M3.decode(FP8_E4M3.encode(big)).tolist() == [448.0, -448.0] * 2 + [448.0]
    assert get_format("fp16").decode(get_format("fp16").encode(big)).tolist()[:4] == [
        65504.0, -65504.0, 65504.0, -65504.0,
    ]  # fmt: skip
    for name in ["fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]:
        fmt = get_format(name)
        assert fmt.decode(fmt.encode(big)).tolist() == [fmt.max_value, -fmt.max_value] * 2 + [
            fmt.max_value
        ]


def test_nan():
    nan = torch.tensor([math.nan])
    for name in ["fp8_e4m3", "fp8_e5m2", "fp16", "bf16"]:
        fmt = get_format(name)
        assert fmt.decode(fmt.encode(nan)).isnan().all()
        assert fmt.decode(fmt._encode_emulated(nan, "nearest", None)).isnan().all()
    assert get_format("fp4").decode(get_format("fp4").encode(nan)).abs().item() == 6.0


FACTS = {
    # name: (max, smallest normal, smallest subnormal, levels)
    "fp8_e4m3": (448.0, 2.0**-6, 2.0**-9, 253),
    "fp8_e5m2": (57344.0, 2.0**-14, 2.0**-16, 247),
    "fp6_e3m2": (28.0, 2.0**-2, 2.0**-4, 63),
    "fp6_e2m3": (7.5, 1.0, 2.0**-3, 63),
    "fp4_e2m1": (6.0, 1.0, 0.5, 15),
    "fp16": (65504.0, 2.0**-14, 2.0**-24, 63487),
    "bf16": (float(torch.finfo(torch.bfloat16).max), 2.0**-126, 2.0**-133, 65279),
}


@pytest.mark.parametrize("name", FACTS)
def test_facts(name):
    fmt = get_format(name)
    assert (fmt.max_value, fmt.smallest_normal, fmt.smallest_subnormal, fmt.levels) == FACTS[name]
    assert fmt.min_value == -fmt.max_value and fmt.kind == "float"
    grid = fmt.grid()
    assert grid.numel() == fmt.levels and grid.dtype == torch.float64
    assert grid.max() == fmt.max_value and (grid == 0).sum() == 1
    assert grid[grid > 0].min() == fmt.smallest_subnormal
    assert torch.all(grid[1:] > grid[:-1])


def test_fp4_grid():
    pos = get_format("fp4_e2m1").grid()
    assert pos[pos >= 0].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert torch.equal(-pos.flip(0), pos)


def test_aliases_and_torch_dtypes():
    assert get_format("e4m3") is get_format("fp8") is get_format("FP8_E4M3") is FP8_E4M3
    assert get_format("e5m2") is FP8_E5M2 and get_format("fp4").name == "fp4_e2m1"
    assert FP8_E4M3.torch_dtype == torch.float8_e4m3fn and get_format("fp4").torch_dtype is None
    assert get_format("fp16").code_dtype == torch.int16 and FP8_E4M3.code_dtype == torch.uint8


@pytest.mark.parametrize(
    "name,inputs,expected",
    [
        # ties go to the even mantissa
        ("fp4_e2m1", [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0], [0, 1, 1, 2, 2, 4, 4, -4]),
        ("fp8_e4m3", [17.0, 19.0, 0.5 + 2**-5, 2.0**-10, 3 * 2.0**-10], [16, 20, 0.5, 0, 2**-8]),
        ("fp6_e3m2", [4.5, 5.5, 26.0, 30.0], [4, 6, 24, 28]),
    ],
)
def test_nearest_ties_to_even(name, inputs, expected):
    fmt = get_format(name)
    y = torch.tensor(inputs)
    assert fmt.round(y).tolist() == expected
    assert fmt.decode(fmt._encode_emulated(y, "nearest", None)).tolist() == expected


def test_signed_zero_matches_torch():
    y = torch.tensor([-0.0, -1e-30, 0.0, 1e-30])
    assert FP8_E4M3.encode(y).tolist() == [0x80, 0x80, 0, 0]
    assert get_format("fp4").encode(y).tolist() == [0x8, 0x8, 0, 0]


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "fp16", "bf16"])
def test_stochastic_rounding_is_unbiased(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(0)
    lo, hi = 1.0, fmt.grid()[fmt.grid() > 1][0].item()  # two neighbours
    x = torch.full((40_000,), lo + 0.3 * (hi - lo), dtype=torch.float32)
    out = fmt.decode(fmt.encode(x, "stochastic", generator=g))
    assert set(out.unique().tolist()) == {lo, hi}
    assert abs(out.double().mean().item() - x[0].item()) < 0.02 * (hi - lo)
    y = fmt.decode(fmt.encode(-x, "stochastic", generator=g))  # sign symmetric
    assert abs(y.double().mean().item() + x[0].item()) < 0.02 * (hi - lo)


def test_stochastic_never_leaves_range_and_keeps_grid_values():
    fmt = get_format("fp4")
    g = torch.Generator().manual_seed(1)
    grid = fmt.grid().float()
    assert torch.equal(fmt.decode(fmt.encode(grid, "stochastic", generator=g)), grid)
    big = torch.tensor([5.9, 6.0, 100.0, -100.0])
    assert fmt.decode(fmt.encode(big, "stochastic", generator=g)).abs().max() <= 6.0


def test_bit_fields():
    assert FP8_E4M3.bit_fields(0x7E) == (0, 15, 6)
    assert FP8_E4M3.bit_string(int(FP8_E4M3.encode(torch.tensor(448.0)))) == "0 1111 110"
    fp16 = get_format("fp16")
    assert fp16.bit_fields(int(fp16.encode(torch.tensor(-2.0)))) == (1, 16, 0)
    s, e, m = get_format("fp4").bit_fields(torch.tensor([0b1011], dtype=torch.uint8))
    assert (s.item(), e.item(), m.item()) == (1, 1, 1)
    assert get_format("fp4").bit_string(0b0111) == "0 11 1"


@pytest.mark.parametrize("name", SMALL)
def test_bits_and_packing_round_trip(name):
    fmt = get_format(name)
    codes = fmt.encode(wide_values(fmt, n=999))
    pattern = fmt.to_bits(codes)
    assert int(pattern.max()) < 2**fmt.bits
    packed = pack(pattern, fmt.bits)
    assert torch.equal(fmt.from_bits(unpack(packed, fmt.bits, codes.numel())), codes)


def test_invalid_formats_name_the_fix():
    with pytest.raises(FormatError, match="1 \\+ exp_bits \\+ man_bits"):
        FloatFormat("bad", 8, exp_bits=4, man_bits=2, bias=7)
    with pytest.raises(FormatError, match="special"):
        FloatFormat("bad", 8, exp_bits=4, man_bits=3, bias=7, special="ocp")
    with pytest.raises(FormatError, match="bias"):
        FloatFormat("bad", 12, exp_bits=8, man_bits=3, bias=200)
    with pytest.raises(FormatError, match="floating-point"):
        FP8_E4M3.encode(torch.tensor([1, 2]))
    with pytest.raises(FormatError, match="rounding"):
        FP8_E4M3.encode(torch.tensor([1.0]), "up")


def test_custom_format_without_torch_dtype():
    e3m4 = FloatFormat("fp8_e3m4", 8, exp_bits=3, man_bits=4, bias=3, special="none")
    assert e3m4.max_value == 31.0 and e3m4.levels == 255
    x = wide_values(e3m4, n=20_000)
    grid = e3m4.grid()
    idx = torch.searchsorted(grid, x.double()).clamp(1, grid.numel() - 1)
    nearest = torch.minimum((x.double() - grid[idx - 1]).abs(), (grid[idx] - x.double()).abs())
    assert torch.equal((e3m4.round(x).double() - x.double()).abs(), nearest)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(SMALL + ["fp16", "bf16"]),
    x=st.floats(allow_nan=False, allow_infinity=False, width=32),
    stochastic=st.booleans(),
)
def test_rounding_picks_a_neighbour_within_half_spacing(name, x, stochastic):
    fmt = get_format(name)
    grid = fmt.grid()
    x = max(min(x, fmt.max_value), -fmt.max_value)
    i = int(torch.searchsorted(grid, torch.tensor([x], dtype=torch.float64)))
    i = min(max(i, 1), len(grid) - 1)
    lo, hi = grid[i - 1].item(), grid[i].item()
    r = fmt.round(torch.tensor([x]), "stochastic" if stochastic else "nearest").item()
    assert r in (lo, hi) or (x == lo == r)
    if not stochastic:
        assert abs(x - r) <= (hi - lo) / 2
