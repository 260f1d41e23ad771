"""The fused native W8A8 decode call (rotate, quantize per token or statically, int8 loop,
scale) against the torch wrappers it replaces."""

import shutil

import pytest
import torch

from lowbit.formats.rotation import hadamard_factors, rotate
from lowbit.kernels import native
from lowbit.kernels.int8_dynamic import (
    decode_callable,
    int8_dynamic_linear,
    int8_static_linear,
    prepare_int8_dynamic,
    prepare_int8_static,
)

pytestmark = pytest.mark.skipif(
    not (native._cpu_has_avx2_fma() and shutil.which("cc")),
    reason="needs an AVX2/FMA CPU and a C compiler")


@pytest.fixture(autouse=True)
def _native_on():
    with native.force(True):
        yield


def _state(n, k, static, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    if static:
        return prepare_int8_static(codes, scale, 0.02)
    return prepare_int8_dynamic(codes, scale)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n,k", [(1536, 576), (13, 48), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_unrotated_is_bit_identical(static, n, k, rows, with_bias):
    """Same codes, same int8 loop, same order of float operations as the torch wrapper."""
    state = _state(n, k, static)
    bias = torch.randn(n) if with_bias else None
    f = decode_callable(state, bias)
    x = torch.randn(rows, k) * 3
    x[0, 0] = 400.0  # an outlier: clamped to +127 under the static scale
    linear = int8_static_linear if static else int8_dynamic_linear
    torch.testing.assert_close(f(x), linear(x, state, bias), atol=0, rtol=0)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("k", [576, 1536, 48, 64])
def test_rotated_matches_rotate_then_wrapper(static, k):
    state = _state(40, k, static, seed=1)
    f = decode_callable(state, None, hadamard_factors(k))
    x = torch.randn(2, 1, k)
    want = (int8_static_linear if static else int8_dynamic_linear)(rotate(x), state)
    got = f(x)
    assert got.shape == (2, 1, 40)
    # the rotation's float sums run in another order, so a code sitting on a rounding
    # boundary may move by one step: y moves by at most 127 x (the output's scale) per code
    x_scale = rotate(x).abs().amax() / 127
    unit = 127 * float((state.out_scale if static else state.scale * x_scale).max())
    assert (got - want).abs().max() <= 2 * unit
    assert (got - want).abs().mean() <= 0.01 * unit  # and almost none does


def test_many_rows_go_back_to_the_wrapper():
    state = _state(20, 48, False)
    f = decode_callable(state, None, hadamard_factors(48))
    x = torch.randn(native.MAX_ROWS, 48)
    torch.testing.assert_close(f(x), int8_dynamic_linear(rotate(x), state), atol=0, rtol=0)
