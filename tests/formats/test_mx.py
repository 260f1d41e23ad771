"""OCP MX formats: facts, hand-checked blocks, a per-block reference, partial blocks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FormatError, get_format
from lowbit.formats.mx import MX_FORMATS, MXFormat, dequantize_mx, quantize_mx
from lowbit.formats.packing import pack, unpack
from lowbit.formats.scaling import quantize_tensor

ELEMENTS = {
    # name: (element, element bits, emax_elem, element max)
    "mxfp8_e4m3": ("fp8_e4m3", 8, 8, 448.0),
    "mxfp8_e5m2": ("fp8_e5m2", 8, 15, 57344.0),
    "mxfp6_e3m2": ("fp6_e3m2", 6, 4, 28.0),
    "mxfp6_e2m3": ("fp6_e2m3", 6, 2, 7.5),
    "mxfp4": ("fp4_e2m1", 4, 2, 6.0),
    "mxint8": ("int8_q6", 8, 0, 127 / 64),
}


def reference_mx(x: torch.Tensor, fmt: MXFormat) -> tuple[list[int], torch.Tensor]:
    """Spec section 6.3 block by block in Python floats: biased exponents and values."""
    exps, out = [], torch.empty_like(x)
    for row in range(x.shape[0]):
        for start in range(0, x.shape[1], fmt.block_size):
            block = x[row, start : start + fmt.block_size]
            amax = block.abs().max().item()
            shared = math.frexp(amax)[1] - 1 - fmt.emax_elem if amax > 0 else -127
            shared = max(-127, min(127, shared))
            exps.append(shared + 127)
            scaled = block.double() * 2.0**-shared
            out[row, start : start + fmt.block_size] = fmt.element.round(scaled.float()) * (
                2.0**shared
            )
    return exps, out


@pytest.mark.parametrize("name", ELEMENTS)
def test_registry_and_facts(name):
    fmt = get_format(name)
    element, bits, emax, max_value = ELEMENTS[name]
    assert isinstance(fmt, MXFormat) and fmt in MX_FORMATS and fmt.kind == "mx"
    assert (fmt.element.name, fmt.bits, fmt.emax_elem, fmt.max_value) == (
        element, bits, emax, max_value,
    )  # fmt: skip
    assert fmt.block_size == 32 and fmt.bits_per_value == bits + 0.25
    assert str(fmt.granularity) == "group:32" and fmt.scale_dtype == "e8m0"
    assert fmt.describe()["bits_per_value"] == bits + 0.25
    assert torch.equal(fmt.grid(), fmt.element.grid()) and fmt.levels == fmt.element.levels


def test_mxfp4_hand_checked_block():
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([12.0, 3.0, -5.0, 0.2, 0.7, 13.9])
    codes, exps = quantize_mx(x, "mxfp4")
    # amax 13.9: floor(log2 13.9) = 3, emax_elem(E2M1) = 2 -> X = 2^1, biased 128
    assert exps.tolist() == [[128]]
    # x / 2 = 6, 1.5, -2.5 (tie -> 2, even), 0.1 -> 0, 0.35 -> 0.5, 6.95 -> 6 (saturates)
    assert codes[0, :6].tolist() == [0b0111, 0b0011, 0b1100, 0b0000, 0b0001, 0b0111]
    values = dequantize_mx(codes, exps, "mxfp4")
    assert values[0, :6].tolist() == [12.0, 3.0, -4.0, 0.0, 1.0, 12.0]


def test_mxint8_and_mxfp8_hand_checked():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([1.0, 0.5, 1 / 128, 3 / 128])
    codes, exps = quantize_mx(x, "mxint8")  # amax 1: X = 2^0, elements k / 64
    assert exps.tolist() == [[127]] and codes[0, :4].tolist() == [64, 32, 0, 2]  # ties even
    y = torch.zeros(1, 32)
    y[0, :2] = torch.tensor([1000.0, -3.0])
    codes, exps = quantize_mx(y, "mxfp8_e4m3")  # floor(log2 1000) = 9, emax 8 -> X = 2
    assert exps.tolist() == [[128]]
    # 1000 / 2 = 500 > 448 saturates (the spec's rule), -3 / 2 = -1.5 exact
    assert dequantize_mx(codes, exps, "mxfp8_e4m3")[0, :2].tolist() == [896.0, -3.0]


@pytest.mark.parametrize("name", ELEMENTS)
def test_matches_per_block_reference_with_partial_block(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 70, generator=g) * torch.logspace(-3, 3, 70)  # varied block scales
    x[1, 32:64] = 0.0  # an all-zero block
    codes, exps = quantize_mx(x, fmt)
    assert codes.shape == x.shape and codes.dtype == fmt.code_dtype
    assert exps.shape == (4, 3) and exps.dtype == torch.uint8
    ref_exps, ref_values = reference_mx(x, fmt)
    assert exps.reshape(-1).tolist() == ref_exps
    assert exps[1, 1] == 0  # zero block: 2^-127 as the reference implementations do
    assert torch.equal(dequantize_mx(codes, exps, fmt), ref_values)


def test_extreme_block_scales_clamp_to_e8m0():
    x = torch.zeros(2, 32)
    x[0, 0], x[1, 0] = 2.0**-140, 3e38
    codes, exps = quantize_mx(x, "mxfp4")
    assert exps[:, 0].tolist() == [0, 127 + 127 - 2]
    values = dequantize_mx(codes, exps, "mxfp4")
    assert values[0, 0] == 0.0  # 2^-140 / 2^-127 rounds to 0 in E2M1
    assert values[1, 0] == 6 * 2.0**125  # 3e38 / 2^125 = 7.05 saturates to 6


def test_agrees_with_generic_scaling_path():
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(3))
    codes, exps = quantize_mx(x, "mxfp6_e2m3")
    codes2, qparams = quantize_tensor(x, "mxfp6_e2m3", "group:32", scale_dtype="e8m0")
    assert torch.equal(codes, codes2)
    assert torch.equal(torch.exp2(exps.float() - 127), qparams.scale)


def test_shape_argument_packing_and_nan_scale():
    fmt = get_format("mxfp4")
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    codes, exps = quantize_mx(x, fmt)
    expected = dequantize_mx(codes, exps, fmt)
    flat = unpack(pack(fmt.to_bits(codes).reshape(-1), 4), 4, codes.numel())
    assert torch.equal(dequantize_mx(fmt.from_bits(flat), exps, fmt, shape=x.shape), expected)
    exps[0, 0] = 255
    out = dequantize_mx(codes, exps, fmt, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out[0, :32].isnan().all() and not out[1:].isnan().any()


def test_errors_name_the_fix():
    x = torch.randn(2, 64)
    with pytest.raises(FormatError, match="not an MX format; use one of"):
        quantize_mx(x, "fp8_e4m3")
    codes, exps = quantize_mx(x, "mxfp8_e4m3")
    with pytest.raises(FormatError, match="exponents have shape"):
        dequantize_mx(codes, exps[:, :1], "mxfp8_e4m3")
    with pytest.raises(FormatError, match="NaN or Inf"):
        quantize_mx(torch.tensor([[1.0, float("nan")]]), "mxfp4")
    with pytest.raises(FormatError, match="element"):
        MXFormat("bad", 4)
    with pytest.raises(FormatError, match="must equal the element"):
        MXFormat("bad", 8, element=get_format("fp4"))


def test_mxint8_element():
    elem = get_format("mxint8").element
    assert (elem.max_value, elem.min_value, elem.levels) == (127 / 64, -127 / 64, 255)
    y = torch.tensor([-2.0, -1.99, 1.99, 0.5, 10.0])
    assert elem.encode(y).tolist() == [-127, -127, 127, 32, 127]
    assert elem.decode(torch.tensor([-128], dtype=torch.int8)).item() == -2.0
    assert torch.equal(elem.from_bits(elem.to_bits(elem.encode(y))), elem.encode(y))


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(list(ELEMENTS)),
    values=st.lists(
        st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
        min_size=1,
        max_size=80,
    ),
)
def test_property_matches_reference(name, values):
    fmt = get_format(name)
    x = torch.tensor([values])
    codes, exps = quantize_mx(x, fmt)
    ref_exps, ref_values = reference_mx(x, fmt)
    assert exps.reshape(-1).tolist() == ref_exps
    assert torch.equal(dequantize_mx(codes, exps, fmt), ref_values)
