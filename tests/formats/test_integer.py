"""Integer, binary and ternary formats."""

import pytest
import torch

from lowbit.formats import FormatError, IntFormat, get_format


@pytest.mark.parametrize("bits", range(1, 9))
def test_integer_facts(bits):
    s, u = get_format(f"int{bits}"), get_format(f"uint{bits}")
    assert (s.min_value, s.max_value) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.min_value, u.max_value) == (0, 2**bits - 1)
    assert s.levels == u.levels == 2**bits == s.grid().numel()


@pytest.mark.parametrize("bits", range(1, 9))
def test_bits_round_trip(bits):
    for fmt in (get_format(f"int{bits}"), get_format(f"uint{bits}")):
        codes = fmt.encode(fmt.grid().float())
        pattern = fmt.to_bits(codes)
        assert int(pattern.max()) < 2**bits
        assert torch.equal(fmt.from_bits(pattern), codes)


def test_round_half_even_and_saturation():
    fmt = get_format("int4")
    y = torch.tensor([0.5, 1.5, 2.5, -0.5, 100.0, -100.0])
    assert fmt.encode(y).tolist() == [0, 2, 2, 0, 7, -8]


@pytest.mark.parametrize("name,grid", [("binary", [-1, 1]), ("ternary", [-1, 0, 1])])
def test_sign_formats(name, grid):
    fmt = get_format(name)
    assert fmt.grid().tolist() == grid
    codes = fmt.encode(torch.tensor([-0.7, -0.2, 0.0, 0.3, 2.0]))
    expected = [-1, -1, 1, 1, 1] if name == "binary" else [-1, 0, 0, 0, 1]
    assert codes.tolist() == expected
    assert torch.equal(fmt.from_bits(fmt.to_bits(codes)), codes)
    assert int(fmt.to_bits(codes).max()) < 2**fmt.bits


def test_bit_width_out_of_range():
    with pytest.raises(FormatError, match="1 to 8 bits"):
        IntFormat("int9", 9)
    with pytest.raises(FormatError, match="1 to 8 bits"):
        IntFormat("int0", 0)
