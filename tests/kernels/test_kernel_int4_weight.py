"""Group-wise 4-bit: the zero-point convention, K/N padding, layout round trip, fast vs ref."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from lowbit.formats.metrics import cosine_similarity
from lowbit.kernels import (
    KernelError,
    assume_cpu,
    dequantize_int4_weight,
    int4_weight_linear,
    native,
    prepare_int4_weight,
    relayout_int4_weight,
    selected_kernel,
    unpack_int4_codes,
)


def _layer(n, k, group, *, bits=4, signed=False, zero_point=True, seed=0):
    """Codes, scale, zero_point and the float weight under lowbit's convention."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // (group or k))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    dtype = torch.int8 if signed else torch.uint8
    q = torch.randint(lo, hi, (n, k), generator=g).to(dtype)
    scale = torch.rand(n, groups, generator=g) * 0.02 + 1e-3
    zp = torch.randint(lo, hi, (n, groups), generator=g).to(dtype) if zero_point else None
    default_zp = 0 if signed else 2 ** (bits - 1)  # symmetric: the middle of the grid
    zpf = zp.float() if zp is not None else torch.full((n, groups), float(default_zp))
    expand = group or k
    w = (q.float() - zpf.repeat_interleave(expand, 1)[:, :k]) * scale.repeat_interleave(
        expand, 1
    )[:, :k]
    return q, scale, zp, w


def _step(scale, group, k):
    return scale.repeat_interleave(group or k, 1)[:, :k]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("zero_point", [True, False])
def test_zero_point_convention(signed, zero_point):
    """w = (d - zero_point) * scale maps onto the kernel's (u - 8) * s + z exactly up to the
    bf16 rounding of s and z: <= 1/16 of a quantization step."""
    k, group = 256, 64
    q, scale, zp, w = _layer(64, k, group, signed=signed, zero_point=zero_point)
    if not zero_point and not signed:  # unsigned symmetric: zero_point 8 implied
        zp = None
    state = prepare_int4_weight(q, scale, zp, group_size=group)
    err = (dequantize_int4_weight(state) - w).abs() / _step(scale, group, k)
    assert err.max() <= 1 / 16
    assert err.mean() < 1 / 100


def test_symmetric_zero_is_exactly_zero():
    q, scale, _, _ = _layer(32, 128, 32)
    state = prepare_int4_weight(q, scale, None, group_size=32)
    assert not state.scales_and_zeros[..., 1].any()  # unsigned, zero_point 8 -> zero 0


def test_offset_convention_q4_1():
    """GGUF Q4_1 stores w = d * q + m (m = the block minimum): pass offset=m. The kernel's
    zero is 8 d + m, up to 23 steps here, and its bf16 rounding moves w by up to
    (8 + |zero| / d) * 2^-8 steps."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 64), generator=g).to(torch.uint8)
    d = torch.rand(32, 2, generator=g) * 0.01 + 1e-3
    m = -torch.rand(32, 2, generator=g) * 15 * d
    w = q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    state = prepare_int4_weight(q, d, group_size=32, offset=m)
    err = (dequantize_int4_weight(state) - w).abs() / d.repeat_interleave(32, 1)
    bound = (8 + (8 + m / d).abs().max()) * 2**-8
    assert err.max() <= bound


def test_kernel_computes_the_dequantized_weight():
    """Feed the identity: the kernel's output is its weight, which must equal the reference
    dequantization (this checks the layout inversion against the kernel itself)."""
    n, k, group = 112, 640, 128  # 112 rows: a full 64-row block plus a 48-row tail
    q, scale, zp, _ = _layer(n, k, group)
    state = prepare_int4_weight(q, scale, zp, group_size=group)
    seen = int4_weight_linear(torch.eye(k, dtype=torch.bfloat16), state).float().T
    ref = dequantize_int4_weight(state)
    assert torch.allclose(seen, ref, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("n", [16, 48, 64, 112, 200, 49152])
@pytest.mark.parametrize("signed", [False, True])
def test_unpack_is_bit_exact(n, signed):
    q, scale, zp, _ = _layer(n, 64, 32, signed=signed)
    state = prepare_int4_weight(q, scale, zp, group_size=32)
    codes = unpack_int4_codes(state)
    assert codes.dtype == q.dtype and torch.equal(codes, q)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (1, 1536, 576), (512, 576, 1536)])
def test_fast_matches_reference(group, m, k, n):
    q, scale, zp, w = _layer(n, k, group)
    state = prepare_int4_weight(q, scale, zp, group_size=group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    fast = int4_weight_linear(x, state, bias, impl="fast")
    ref = int4_weight_linear(x, state, bias, impl="reference")
    exact = x @ w.T + bias  # lowbit's float weight, before any bf16 rounding
    assert fast.shape == (m, n) and fast.dtype == torch.float32
    assert cosine_similarity(ref, fast) > 0.9999
    assert cosine_similarity(exact, fast) > 0.9999
    assert float((ref - fast).abs().max() / ref.abs().max()) < 2e-2


@pytest.mark.parametrize("native_bf16", [True, False])
def test_prefill_path_matches_reference(native_bf16):
    """From PREFILL_ROWS rows on, ``auto`` dequantizes with the kernel's own bf16 scales and
    runs the CPU's fast float GEMM: the same weights as the kernel and the reference."""
    q, scale, zp, _ = _layer(200, 576, 128)
    state = prepare_int4_weight(q, scale, zp, group_size=128)
    x = torch.randn(2, 40, 576, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(200)
    with assume_cpu(native_bf16=native_bf16):
        name = "bf16" if native_bf16 else "fp32"
        assert selected_kernel("int4_weight", x) == f"int4_weight.dequant_{name}_linear"
        decode = ("int4_weight.native_avx2_gemv" if not native_bf16 and native.available()
                  else "int4_weight.int4pack_mm")
        assert selected_kernel("int4_weight", x[:, :3]) == decode
        auto = int4_weight_linear(x, state, bias)
    ref = int4_weight_linear(x, state, bias, impl="reference")
    assert auto.shape == (2, 40, 200) and auto.dtype == torch.float32
    tol = 2e-2 if native_bf16 else 1e-5
    assert float((ref - auto).abs().max() / ref.abs().max()) < tol


def test_partial_last_group_keeps_its_own_scale():
    """K = 576, group 128: 4 full groups and one of 64; padded to 640, never regrouped."""
    k, group = 576, 128
    q, scale, zp, w = _layer(64, k, group)
    scale[:, -1] *= 50  # a very different last group: any regrouping would show
    w = (q.float() - zp.float().repeat_interleave(group, 1)[:, :k]) * _step(scale, group, k)
    state = prepare_int4_weight(q, scale, zp, group_size=group)
    assert state.kernel_group_size == 128 and state.k_padding == 64
    assert state.packed.shape == (64, 320) and state.scales_and_zeros.shape == (5, 64, 2)
    x = torch.randn(4, k)
    assert cosine_similarity(x @ w.T, int4_weight_linear(x, state)) > 0.9999
    assert cosine_similarity(x @ w.T, int4_weight_linear(x, state, impl="reference")) > 0.9999


@pytest.mark.parametrize("group,kernel_group", [(None, 64), (512, 256), (96, 32)])
def test_coarser_groups_run_with_repeated_scales(group, kernel_group):
    k = 576
    q, scale, zp, w = _layer(48, k, group)
    state = prepare_int4_weight(q, scale, zp, group_size=group)
    assert state.kernel_group_size == kernel_group
    x = torch.randn(3, k)
    assert cosine_similarity(x @ w.T, int4_weight_linear(x, state)) > 0.9999


def test_head_shape_decode():
    q, scale, zp, w = _layer(49152, 64, 32)
    state = prepare_int4_weight(q, scale, zp, group_size=32)
    x = torch.randn(1, 64)
    assert cosine_similarity(x @ w.T, int4_weight_linear(x, state)) > 0.9999


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("signed", [False, True])
def test_low_bit_codes_run_on_the_int4_kernel(bits, signed):
    q, scale, zp, w = _layer(64, 576, 64, bits=bits, signed=signed)
    state = prepare_int4_weight(q, scale, zp, group_size=64)
    x = torch.randn(5, 576)
    assert cosine_similarity(x @ w.T, int4_weight_linear(x, state)) > 0.9999
    assert torch.equal(unpack_int4_codes(state), q)


def test_n_padding_and_shapes():
    q, scale, zp, w = _layer(40, 100, 32)  # N % 16 != 0 and K % 32 != 0
    state = prepare_int4_weight(q, scale, zp, group_size=32)
    assert state.n_padding == 8 and state.k_padding == 28
    x = torch.randn(2, 3, 100)
    for dtype in (torch.float32, torch.bfloat16):
        y = int4_weight_linear(x.to(dtype), state)
        assert y.shape == (2, 3, 40) and y.dtype == dtype
        assert cosine_similarity(x @ w.T, y) > 0.999


def test_clear_errors():
    q, scale, zp, _ = _layer(32, 64, 32)
    with pytest.raises(KernelError, match="multiple of 32"):
        prepare_int4_weight(q, scale.repeat(1, 2), zp.repeat(1, 2), group_size=16)
    with pytest.raises(KernelError, match=r"\[32, 2\]"):
        prepare_int4_weight(q, scale[:, :1], zp, group_size=32)
    with pytest.raises(KernelError, match="0..15"):
        prepare_int4_weight(q + 16, scale, zp, group_size=32)
    with pytest.raises(KernelError, match="uint8"):
        prepare_int4_weight(q.int(), scale, zp, group_size=32)
    with pytest.raises(KernelError, match="not both"):
        prepare_int4_weight(q, scale, zp, group_size=32, offset=scale)
    state = prepare_int4_weight(q, scale, zp, group_size=32)
    with pytest.raises(KernelError, match="64 input features"):
        int4_weight_linear(torch.randn(1, 63), state)


def test_import_probes_nothing():
    """The packing layout is probed on first prepare, never at import."""
    code = (
        "import lowbit.kernels, lowbit.kernels.int4_weight as m\n"
        "print(m._layout.cache_info().currsize)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def _pack_foreign(nibbles: torch.Tensor, block: int) -> torch.Tensor:
    """Pack like torch's AVX2/AVX-512 code with ``block``-row blocks (pairs in a short tail)."""
    n, k = nibbles.shape
    out = []
    for start in range(0, n, block):
        rows = nibbles[start : start + block]
        size = rows.shape[0]
        if size == block:  # row r low nibble, row r + block / 2 high nibble
            lo, hi = rows[: block // 2], rows[block // 2 :]
        else:  # neighbouring rows 2j, 2j + 1
            lo, hi = rows[0::2], rows[1::2]
        out.append((lo | (hi << 4)).T.reshape(-1))  # k-major within the block
    return torch.cat(out).to(torch.uint8).view(n, k // 2)


def test_relayout_from_another_cpu():
    q, scale, zp, w = _layer(112, 128, 32)
    state = prepare_int4_weight(q, scale, zp, group_size=32)
    for block in (32, 64):
        foreign = dataclasses.replace(state, packed=_pack_foreign(q.int(), block),
                                      layout=(block, True))
        assert torch.equal(unpack_int4_codes(foreign), q)
        fixed = relayout_int4_weight(foreign)
        assert fixed.layout == state.layout and torch.equal(fixed.packed, state.packed)


def test_packing_in_row_chunks_is_bit_exact(monkeypatch):
    import lowbit.kernels.int4_weight as k4

    q, scale, zp, _ = _layer(300, 64, 32)
    whole = prepare_int4_weight(q, scale, zp, group_size=32)
    monkeypatch.setattr(k4, "PACK_ROWS", 128)  # 128, 128, then 44 rows (+4 padding)
    chunked = prepare_int4_weight(q, scale, zp, group_size=32)
    assert torch.equal(whole.packed, chunked.packed)
    assert torch.equal(unpack_int4_codes(chunked), q)
