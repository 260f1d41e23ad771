"""Weight-only int8: ``_weight_int8pack_mm`` on bf16 activations vs the fp32 reference."""

import pytest
import torch

from lowbit.formats.metrics import cosine_similarity
from lowbit.kernels import (
    KERNELS,
    KernelError,
    assume_cpu,
    dequantize_int8_weight,
    int8_weight_linear,
    native,
    prepare_int8_weight,
    selected_kernel,
)

SHAPES = [  # (M, K, N)
    (1, 576, 1536),  # decode, MLP up
    (1, 1536, 576),  # decode, MLP down
    (512, 576, 1536),  # prefill
    (3, 64, 49152),  # output-head width, short K
    (5, 95, 37),  # K not a multiple of 16: padded
    (2, 16, 1),
]


def _layer(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    return q, scale


def _max_rel(ref, out):
    return float((ref - out).abs().max() / ref.abs().max())


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fast_matches_reference(m, k, n, with_bias):
    q, scale = _layer(n, k)
    state = prepare_int8_weight(q, scale)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n) if with_bias else None
    fast = int8_weight_linear(x, state, bias, impl="fast")
    ref = int8_weight_linear(x, state, bias, impl="reference")
    exact = x.double() @ (q.double() * scale.double()[:, None]).T
    if bias is not None:
        exact += bias.double()
    assert fast.dtype == torch.float32 and fast.shape == (m, n)
    assert torch.allclose(ref.double(), exact, rtol=1e-4, atol=1e-4)
    assert cosine_similarity(ref, fast) > 0.9999
    assert _max_rel(ref, fast) < 2e-2  # bf16 activations and output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native_bf16", [True, False])
def test_prefill_path_widens_to_the_fast_float_dtype(dtype, native_bf16):
    q, scale = _layer(1536, 95)  # padded K too
    state = prepare_int8_weight(q, scale)
    x = torch.randn(4, 128, 95, generator=torch.Generator().manual_seed(1)).to(dtype)
    with assume_cpu(native_bf16=native_bf16):
        widen = "bf16" if native_bf16 else "fp32"
        assert selected_kernel("int8_weight", x) == f"int8_weight.widen_{widen}_linear"
        decode = ("int8_weight.native_avx2_gemv" if not native_bf16 and native.available()
                  else "int8_weight.int8pack_mm")
        assert selected_kernel("int8_weight", x, "fast") == decode
        bias = torch.randn(1536)
        auto = int8_weight_linear(x, state, bias)
    ref = int8_weight_linear(x, state, bias, impl="reference")
    assert auto.shape == (4, 128, 1536) and auto.dtype == dtype
    assert cosine_similarity(ref, auto) > 0.9999
    assert _max_rel(ref.float(), auto.float()) < 2e-2


def test_padding_of_k():
    q, scale = _layer(37, 95)
    state = prepare_int8_weight(q, scale)
    assert state.qdata.shape == (37, 96) and state.k_padding == 1
    assert torch.equal(state.qdata[:, :95], q) and not state.qdata[:, 95:].any()
    assert torch.equal(dequantize_int8_weight(state), q.float() * scale[:, None])


def test_no_copy_when_aligned():
    q, scale = _layer(64, 128)
    assert prepare_int8_weight(q, scale).qdata.data_ptr() == q.data_ptr()


def test_shapes_and_dtypes():
    q, scale = _layer(48, 64)
    state = prepare_int8_weight(q, scale)
    x = torch.randn(2, 3, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = int8_weight_linear(x.to(dtype), state, torch.randn(48))
        assert y.shape == (2, 3, 48) and y.dtype == dtype
    ref = int8_weight_linear(x, state, impl="reference")
    assert cosine_similarity(ref, int8_weight_linear(x.bfloat16(), state)) > 0.9999


def test_misaligned_bf16_view_is_copied_not_crashed():
    # the kernel's aligned loads segfault on a bf16 view starting 16 bytes into a vector
    q, scale = _layer(32, 64)
    state = prepare_int8_weight(q, scale)
    base = torch.randn(3 * 64 + 8).bfloat16()
    x = base[8 : 8 + 2 * 64].view(2, 64)
    assert x.data_ptr() % 32 != 0
    y = int8_weight_linear(x, state)
    ref = int8_weight_linear(x.float(), state, impl="reference")
    assert cosine_similarity(ref, y) > 0.9999


def test_non_contiguous_input():
    q, scale = _layer(32, 64)
    state = prepare_int8_weight(q, scale)
    x = torch.randn(64, 5).T  # non-contiguous [5, 64]
    assert cosine_similarity(
        int8_weight_linear(x, state, impl="reference"), int8_weight_linear(x, state)
    ) > 0.9999


def test_kernel_names():
    x = torch.randn(1, 8)
    with native.force(False):
        assert selected_kernel("int8_weight", x) == "int8_weight.int8pack_mm"
    with native.force(True):
        assert selected_kernel("int8_weight", x) == (
            "int8_weight.native_avx2_gemv" if native.available() else "int8_weight.int8pack_mm")
    assert selected_kernel("int8_weight", x, "reference") == "int8_weight.reference"
    assert selected_kernel("int8_weight", x.requires_grad_()) == "int8_weight.reference"
    names = {selected_kernel(f, x, i) for f in ("int8_weight", "int4_weight", "int8_dynamic",
             "int8_static", "integer_only") for i in ("fast", "reference")}
    assert names <= set(KERNELS)
    with pytest.raises(KernelError, match="unknown kernel family"):
        selected_kernel("int3_weight", x)


def test_clear_errors():
    q, scale = _layer(8, 32)
    state = prepare_int8_weight(q, scale)
    with pytest.raises(KernelError, match="32 input features"):
        int8_weight_linear(torch.randn(2, 31), state)
    with pytest.raises(KernelError, match="floating point"):
        int8_weight_linear(torch.ones(2, 32, dtype=torch.int32), state)
    with pytest.raises(KernelError, match="unknown impl"):
        int8_weight_linear(torch.randn(2, 32), state, impl="turbo")
    with pytest.raises(KernelError, match="bias"):
        int8_weight_linear(torch.randn(2, 32), state, torch.randn(7))
    with pytest.raises(KernelError, match="int8"):
        prepare_int8_weight(q.int(), scale)
    with pytest.raises(KernelError, match=r"shape \[8\]"):
        prepare_int8_weight(q, scale[:4])
    with pytest.raises(KernelError, match="NaN"):
        prepare_int8_weight(q, torch.full((8,), float("nan")))
