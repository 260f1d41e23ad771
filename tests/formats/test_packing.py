"""Sub-byte packing round-trips and really shrinks the bytes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FormatError, get_format, pack, packed_size, unpack


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 8), st.integers(1, 3), st.integers(1, 70), st.integers(0, 2**31))
def test_pack_round_trip(bits, rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (rows, n), generator=gen, dtype=torch.uint8)
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), values)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_n_values_take_n_bits_over_8_bytes(bits):
    n = 4096
    assert pack(torch.zeros(n, dtype=torch.uint8), bits).numel() == n * bits // 8


def test_int4_codes_through_format_and_packing():
    fmt = get_format("int4")
    codes = fmt.encode(torch.arange(-8, 8).float())
    packed = pack(fmt.to_bits(codes), 4)
    assert packed.numel() == 8
    assert torch.equal(fmt.from_bits(unpack(packed, 4, 16)), codes)


def test_pack_known_layout():
    # little-endian nibbles: value 0 in the low nibble
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 0, 0, 1], dtype=torch.uint8), 2).tolist() == [0b01000001]


def test_pack_errors():
    with pytest.raises(FormatError, match="1 to 8 bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(FormatError, match="to_bits"):
        pack(torch.zeros(4), 4)
    with pytest.raises(FormatError, match="expected"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 16)
