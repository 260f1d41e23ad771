"""GGUF block packing against ``gguf.quants`` (llama.cpp's block arithmetic in numpy)."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

from lowbit.export import gguf_blocks as blocks  # noqa: E402


def _weights(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((48, 192)) * rng.exponential(1.0, (48, 1))).astype(np.float32)
    w[0, :32] = 0  # an all-zero block (d = 0)
    w[1, :32] = np.linspace(-1, 1, 32)  # exact halves after scaling
    w[2, :32] = 0.5  # a constant block
    w[3, 40] = -8 * np.abs(w[3]).max()  # a negative extreme
    w[4, :32] = np.float32(1e-6) * rng.standard_normal(32)  # tiny values (fp16 subnormal d)
    return w


@pytest.mark.parametrize("name", blocks.REFERENCE_ROUNDED)
@pytest.mark.parametrize("seed", [0, 1])
def test_rounding_floats_matches_gguf_quantize_byte_for_byte(name, seed):
    w = _weights(seed)
    ours = blocks.pack(name, *blocks.round_float(w, name))
    theirs = quantize(w, blocks.ggml_type(name))
    assert ours.shape == theirs.shape == (48, 192 // 32 * blocks.block_bytes(name))
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", list(blocks.BLOCK_TYPES))
def test_packed_codes_decode_to_the_block_formula(name):
    bits, has_min = blocks.BLOCK_TYPES[name]
    rng = np.random.default_rng(3)
    rows, cols = 8, 96
    if name == "q8_0":
        codes = rng.integers(-128, 128, (rows, cols)).astype(np.int8)
        values = codes.astype(np.float32)
    elif name == "iq4_nl":  # llama.cpp's kvalues_iq4nl, written out here independently
        codes = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
        table = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69,
                          89, 113], np.float32)
        values = table[codes]
    else:
        codes = rng.integers(0, 1 << bits, (rows, cols)).astype(np.uint8)
        values = codes.astype(np.float32) - blocks.OFFSET[name]
    d = rng.uniform(0.001, 0.1, (rows, cols // 32)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-1, 0, (rows, cols // 32)).astype(np.float16).astype(np.float32) \
        if has_min else None
    data = blocks.pack(name, codes, d, m)
    expect = values * np.repeat(d, 32, axis=1)
    if has_min:
        expect = expect + np.repeat(m, 32, axis=1)
    got = dequantize(data, blocks.ggml_type(name)).reshape(rows, cols)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
