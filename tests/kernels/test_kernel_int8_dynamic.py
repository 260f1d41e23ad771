"""W8A8 (dynamic per-token and static per-tensor) on ``torch._int_mm`` vs float64."""

import pytest
import torch

from lowbit.formats.metrics import cosine_similarity
from lowbit.kernels import (
    KernelError,
    assume_cpu,
    int8_dynamic_linear,
    int8_static_linear,
    native,
    prepare_int8_dynamic,
    prepare_int8_static,
    quantize_per_tensor,
    quantize_per_token,
    selected_kernel,
)

SHAPES = [(1, 576, 1536), (1, 1536, 576), (512, 576, 1536), (2, 64, 49152), (3, 37, 5)]


def _layer(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    return q, scale, w


@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 64])
def test_int_mm_is_exact_for_small_m_on_cpu(m):
    """The 'M > 16' rule is CUDA's: on the CPU _int_mm takes any M and is exact, even at
    the extremes of int8."""
    for lo, hi in ((-128, 128), (-128, -127), (127, 128)):
        a = torch.randint(lo, hi, (m, 576), dtype=torch.int8)
        b = torch.randint(lo, hi, (1536, 576), dtype=torch.int8)
        assert torch.equal(torch._int_mm(a, b.T).long(), a.long() @ b.long().T)


def test_quantize_per_token():
    x = torch.randn(4, 96)
    x[2] = 0
    codes, scale = quantize_per_token(x)
    assert codes.dtype == torch.int8 and scale.shape == (4, 1)
    assert codes.abs().max() == 127 and not codes[2].any()
    assert (codes.float() * scale - x).abs().max() <= scale.max() / 2 + 1e-6


def test_quantize_per_tensor_clamps():
    codes = quantize_per_tensor(torch.tensor([[0.0, 0.26, -1.0, 100.0]]), 0.1)
    assert codes.tolist() == [[0, 3, -10, 127]]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("vnni", [True, False])
def test_dynamic_fast_matches_reference(m, k, n, with_bias, vnni):
    """Both CPU paths: ``torch._int_mm`` (VNNI) and the float32 GEMM on the same codes."""
    q, scale, w = _layer(n, k)
    state = prepare_int8_dynamic(q, scale)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n) if with_bias else None
    with assume_cpu(vnni=vnni):
        fast = int8_dynamic_linear(x, state, bias, impl="fast")
    ref = int8_dynamic_linear(x, state, bias, impl="reference")
    assert fast.shape == (m, n) and fast.dtype == torch.float32
    # same codes, exact integer sums: only the float32 rescale differs
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5)
    exact = x @ w.T + (0 if bias is None else bias)
    assert cosine_similarity(exact, fast) > 0.999  # the cost of int8 activations


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("vnni", [True, False])
def test_static_fast_matches_reference(m, k, n, vnni):
    q, scale, w = _layer(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    act_scale = float(x.abs().max()) / 127
    state = prepare_int8_static(q, scale, act_scale)
    bias = torch.randn(n)
    with assume_cpu(vnni=vnni):
        fast = int8_static_linear(x, state, bias, impl="fast")
    ref = int8_static_linear(x, state, bias, impl="reference")
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5)
    assert cosine_similarity(x @ w.T + bias, fast) > 0.99


def test_shapes_dtypes_and_names():
    q, scale, _ = _layer(24, 40)
    state = prepare_int8_dynamic(q, scale)
    x = torch.randn(2, 3, 40)
    for dtype in (torch.float32, torch.bfloat16):
        y = int8_dynamic_linear(x.to(dtype), state, torch.randn(24))
        assert y.shape == (2, 3, 24) and y.dtype == dtype
    static = prepare_int8_static(q, scale, torch.tensor(0.02))
    assert int8_static_linear(x, static).shape == (2, 3, 24)
    with assume_cpu(vnni=True):
        assert selected_kernel("int8_dynamic", x) == "int8_dynamic.int_mm"
    with assume_cpu(vnni=False), native.force(False):
        assert selected_kernel("int8_dynamic", x) == "int8_dynamic.fp32_gemm"
        assert selected_kernel("int8_static", x) == "int8_static.fp32_gemm"
    with assume_cpu(vnni=False), native.force(True):  # few rows: lowbit's AVX2 loop
        decode = "native_avx2_gemv" if native.available() else "fp32_gemm"
        assert selected_kernel("int8_dynamic", x) == f"int8_dynamic.{decode}"
        assert selected_kernel("int8_static", x) == f"int8_static.{decode}"
        assert selected_kernel("int8_static", torch.zeros(64, 40)) == "int8_static.fp32_gemm"
    assert selected_kernel("int8_static", x, "reference") == "int8_static.reference"


def test_float_gemm_is_exact_at_the_extremes_of_int8():
    """Without VNNI the integer sums run as a float32 GEMM: exact while |sum| < 2^24
    (K = 576 at +-127: 9.3M), as the int32 sums of ``torch._int_mm`` are."""
    from lowbit.kernels.int8_dynamic import integer_matmul

    for lo, hi in ((-127, 128), (127, 128), (-127, -126)):
        for rows in (64, 3):  # the float GEMM, and lowbit's AVX2 loop for few rows
            a = torch.randint(lo, hi, (rows, 576), dtype=torch.int8)
            b = torch.randint(lo, hi, (96, 576), dtype=torch.int8)
            with assume_cpu(vnni=False), native.force(True):
                got = integer_matmul(a, b)
            assert torch.equal(got.long(), a.long() @ b.long().T)


def test_clear_errors():
    q, scale, _ = _layer(8, 16)
    state = prepare_int8_dynamic(q, scale)
    with pytest.raises(KernelError, match="16 input features"):
        int8_dynamic_linear(torch.randn(2, 15), state)
    with pytest.raises(KernelError, match="per-tensor"):
        prepare_int8_static(q, scale, torch.ones(3))
    with pytest.raises(KernelError, match="positive"):
        prepare_int8_static(q, scale, 0.0)
    with pytest.raises(KernelError, match="2-D"):
        prepare_int8_dynamic(q[0], scale)
