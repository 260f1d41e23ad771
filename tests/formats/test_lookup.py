"""Lookup formats: NF4 constants, nearest/stochastic encoding, user codebooks, log grid."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FormatError, get_format, register_format, sqnr_db
from lowbit.formats.base import _REGISTRY
from lowbit.formats.lookup import NF4_VALUES, LookupFormat, codebook, log_format, nf4_values
from lowbit.formats.packing import pack, unpack
from lowbit.formats.scaling import dequantize, quantize_tensor


def brute_force_nearest(fmt, y: torch.Tensor) -> torch.Tensor:
    """Index of the closest value, the lower one on ties (argmin returns the first)."""
    dist = (y.double().reshape(-1, 1) - fmt.grid().reshape(1, -1)).abs()
    return dist.argmin(dim=1).reshape(y.shape)


def test_nf4_values_match_qlora():
    fmt = get_format("nf4")
    assert fmt.kind == "lookup" and fmt.bits == 4 and fmt.levels == 16
    assert fmt.values == tuple(torch.tensor(NF4_VALUES, dtype=torch.float32).tolist())
    assert (fmt.min_value, fmt.max_value) == (-1.0, 1.0) and 0.0 in fmt.values
    assert fmt.values[8] == pytest.approx(0.07958029955625534)
    assert fmt.smallest_normal == pytest.approx(0.07958029955625534)
    # derived again from the normal quantile function as the paper defines it
    torch.testing.assert_close(nf4_values(), torch.tensor(NF4_VALUES), atol=1e-6, rtol=0)


def test_nearest_matches_brute_force_and_ties_go_low():
    fmt = get_format("nf4")
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50_000, generator=g) * 0.6
    grid = fmt.grid()
    mids = ((grid[:-1] + grid[1:]) / 2).float()  # float32 near-ties
    y = torch.cat([y, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    assert torch.equal(fmt.encode(y).long(), brute_force_nearest(fmt, y))
    book = codebook([0.0, 1.0, 3.0])
    assert book.encode(torch.tensor([0.5, 2.0, 2.0001, -9.0, 9.0])).tolist() == [0, 1, 2, 0, 2]


def test_decode_encode_round_trip_and_shape():
    fmt = get_format("nf4")
    grid = fmt.grid().float()
    codes = fmt.encode(grid)
    assert codes.dtype == torch.uint8 and codes.tolist() == list(range(16))
    assert torch.equal(fmt.decode(codes), grid)
    y = torch.randn(3, 5, 7)
    assert fmt.encode(y).shape == y.shape and fmt.round(y).dtype == torch.float32


def test_stochastic_unbiased_and_neighbours_only():
    fmt = get_format("nf4")
    lo, hi = fmt.values[9], fmt.values[10]
    x = torch.full((40_000,), lo + 0.25 * (hi - lo))
    out = fmt.decode(fmt.encode(x, "stochastic", generator=torch.Generator().manual_seed(0)))
    assert set(out.unique().tolist()) <= {lo, hi}
    assert abs(out.double().mean().item() - x[0].item()) < 0.02 * (hi - lo)


def test_codebook_sorts_dedups_and_sizes():
    book = codebook(torch.tensor([0.5, -1.0, 0.5, 2.0]), name="kmeans3")
    assert book.values == (-1.0, 0.5, 2.0) and book.bits == 2 and book.levels == 3
    assert codebook([1.0]).bits == 1
    assert codebook(range(256)).bits == 8
    assert codebook([1.0, 2.0], bits=4).bits == 4
    assert book.to_bits(book.encode(torch.tensor([2.0]))).tolist() == [2]


def test_codebook_registers_by_name():
    book = register_format(codebook([-2.0, -0.5, 0.5, 2.0], name="test_book4"))
    try:
        assert get_format("TEST_BOOK4") is book
        codes, qparams = quantize_tensor(torch.tensor([4.0, -1.0, 0.9]), "test_book4")
        assert dequantize(codes, qparams).tolist() == [4.0, -1.0, 1.0]
    finally:
        _REGISTRY.pop("test_book4")


def test_codebook_errors_name_the_fix():
    with pytest.raises(FormatError, match="at least one"):
        codebook([])
    with pytest.raises(FormatError, match="finite"):
        codebook([0.0, float("nan")])
    with pytest.raises(FormatError, match="raise bits"):
        codebook(range(5), bits=2)
    with pytest.raises(FormatError, match="codebook\\(values\\)"):
        LookupFormat("unsorted", 2, values=(1.0, 0.0))


def test_log4_power_of_two_grid():
    fmt = get_format("log4")
    mags = [2.0**-k for k in range(7)]
    assert fmt.grid().tolist() == sorted([-m for m in mags] + [0.0] + mags)
    assert fmt.levels == 15 and fmt.smallest_normal == 2.0**-6
    assert fmt.round(torch.tensor([0.74, 0.76, 0.3, -0.01, 0.005])).tolist() == [
        0.5, 1.0, 0.25, -2.0**-6, 0.0,
    ]  # fmt: skip
    assert log_format(2).grid().tolist() == [-1.0, 0.0, 1.0]
    with pytest.raises(FormatError, match="2 to 8 bits"):
        log_format(1)


def test_nf4_blockwise_quantization_quality_and_packing():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    codes, qparams = quantize_tensor(w, "nf4", "group:64")
    assert sqnr_db(w, dequantize(codes, qparams)) > 18.0  # ~20 dB for NF4 on Gaussian data
    packed = pack(get_format("nf4").to_bits(codes), 4)
    assert packed.shape == (64, 128)
    assert torch.equal(unpack(packed, 4, 256), codes)


@settings(max_examples=300, deadline=None)
@given(x=st.floats(min_value=-2, max_value=2, allow_nan=False, width=32))
def test_nearest_error_is_the_distance_to_the_table(x):
    fmt = get_format("nf4")
    y = torch.tensor([x])
    err = (fmt.round(y).double() - y.double()).abs().item()
    assert err == (fmt.grid() - y.double()).abs().min().item()
