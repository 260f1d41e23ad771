"""lowbit's AVX2 decode loops (kernels/csrc) against the plain float32 reference paths."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from lowbit.kernels import (
    dequantize_int4_weight,
    int4_weight_linear,
    int8_weight_linear,
    native,
    prepare_int4_weight,
    prepare_int8_weight,
    selected_kernel,
)
from lowbit.kernels.int4_weight import decode_callable as int4_decode_callable
from lowbit.kernels.int8_weight import decode_callable as int8_decode_callable

CAN_BUILD = native._cpu_has_avx2_fma() and shutil.which("cc") is not None
needs_native = pytest.mark.skipif(not CAN_BUILD, reason="needs an AVX2/FMA CPU and a C compiler")


@pytest.fixture(autouse=True)
def _native_on():
    with native.force(True):
        yield


def _rel_err(y, ref):
    return float((y - ref).abs().max() / ref.abs().max())


@needs_native
def test_builds_and_loads_here():
    """Where the CPU and a compiler allow it the library must build: a silent fallback
    would hide that decode runs torch's slower kernels."""
    assert native.available(), native.why_unavailable()


@needs_native
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    path = native._build()
    assert path.parent == tmp_path / "native" and path.exists()
    for old in ("gemv_avx2-0000.so", "lowbit-native-0000.so"):  # earlier versions, pruned
        (path.parent / old).write_bytes(b"")
    path.unlink()
    path = native._build()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary or old build
    mtime = path.stat().st_mtime_ns
    assert native._build() == path and path.stat().st_mtime_ns == mtime  # not rebuilt


@needs_native
@pytest.mark.parametrize("n,k", [(576, 576), (50, 100), (7, 9), (1536, 33)])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_matches_reference(n, k, rows, with_bias):
    """Odd K (scalar tail; the codes are padded to 16), N not a multiple of 4, several rows."""
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    state = prepare_int8_weight(q, scale)
    x = torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    assert selected_kernel("int8_weight", x) == "int8_weight.native_avx2_gemv"
    y = int8_weight_linear(x, state, bias)
    ref = int8_weight_linear(x, state, bias, impl="reference")
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert _rel_err(y, ref) < 1e-5  # float32 accumulation in another order


@needs_native
@pytest.mark.parametrize("n,k,group", [
    (576, 576, 128),   # SmolLM2: K padded to 640 for the kernel
    (192, 576, 64), (64, 512, 32), (96, 512, 256), (48, 256, None),  # 48: a 16-row tail block
    (1536, 1536, 128),
])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("rows", [1, 4])
def test_int4_matches_reference(n, k, group, signed, rows):
    """The same bf16 scale/zero as the reference; activations are rounded to int16 per row
    (2^-16 of the row's largest), far finer than the bf16 rounding of torch's kernel."""
    g = torch.Generator().manual_seed(n + k)
    groups = -(-k // (group or k))
    lo, hi, dtype = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    q = torch.randint(lo, hi, (n, k), generator=g).to(dtype)
    scale = torch.rand(n, groups, generator=g) * 0.02 + 1e-3
    zp = None if signed else torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8)
    state = prepare_int4_weight(q, scale, zp, group_size=group)
    x = torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g)
    assert selected_kernel("int4_weight", x) == "int4_weight.native_avx2_gemv"
    y = int4_weight_linear(x, state, bias)
    ref = torch.nn.functional.linear(x, dequantize_int4_weight(state), bias)
    assert y.shape == (rows, n)
    assert _rel_err(y, ref) < 2e-4
    with native.force(False):  # torch's kernel on bf16 activations: coarser
        assert _rel_err(int4_weight_linear(x, state, bias), ref) > _rel_err(y, ref)


@needs_native
def test_bf16_and_3d_inputs_keep_their_dtype_and_shape():
    q = torch.randint(-128, 128, (64, 96), dtype=torch.int8)
    state = prepare_int8_weight(q, torch.rand(64) * 0.01)
    x = torch.randn(2, 1, 96)
    y = int8_weight_linear(x.bfloat16(), state)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 1, 64)
    ref = int8_weight_linear(x, state, impl="reference")
    assert _rel_err(y.float(), ref) < 1e-2


@needs_native
@pytest.mark.parametrize("family", ["int8", "int4"])
def test_decode_callable_matches_the_wrapper_and_hands_prefill_back(family):
    if family == "int8":
        state = prepare_int8_weight(torch.randint(-128, 128, (256, 576), dtype=torch.int8),
                                    torch.rand(256) * 0.01)
        linear, make = int8_weight_linear, int8_decode_callable
    else:
        state = prepare_int4_weight(torch.randint(0, 16, (256, 576), dtype=torch.uint8),
                                    torch.rand(256, 5) * 0.01, torch.full((256, 5), 8.0),
                                    group_size=128)
        linear, make = int4_weight_linear, int4_decode_callable
    bias = torch.randn(256)
    f = make(state, bias)
    for shape in ((1, 576), (1, 1, 576), (3, 576), (1, 40, 576)):  # 40 rows: prefill path
        x = torch.randn(*shape)
        assert torch.allclose(f(x), linear(x, state, bias), rtol=1e-5, atol=1e-5)
    with native.force(False):
        assert make(state, bias) is None


def test_disabled_falls_back_to_torch(monkeypatch):
    """LOWBIT_NATIVE=0 turns the loops off in a fresh process (read once per process)."""
    import subprocess
    import sys

    code = ("import torch; from lowbit.kernels import selected_kernel, native;"
            "print(selected_kernel('int8_weight', torch.zeros(1, 8)), native.why_unavailable())")
    env = {**os.environ, "LOWBIT_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split()[0] == "int8_weight.int8pack_mm"
    assert "LOWBIT_NATIVE=0" in out


def test_source_ships_with_the_package():
    assert all(p.exists() and Path(p).suffix == ".c" for p in native.SOURCES)


def _pack_interleaved(nibbles: torch.Tensor, block: int) -> torch.Tensor:
    """``int4pack``'s interleaved layout (``int4_weight._unpack``'s inverse) for ``block`` rows:
    per block and input k, byte j = row j (low nibble) | row j + block/2 (high nibble)."""
    n, k = nibbles.shape
    b = nibbles.view(n // block, block, k).permute(0, 2, 1)  # [blocks, k, block]
    half = block // 2
    return (b[..., :half] | (b[..., half:] << 4)).contiguous().view(n, k // 2)


@needs_native
def test_int4_avx512_layout_of_64_row_blocks():
    """AVX-512 builds of torch pack 64-row blocks; the loop reads either layout."""
    from lowbit.kernels.int4_weight import _unpack

    n, k = 128, 256
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    state = prepare_int4_weight(q, torch.rand(n, 2) * 0.02, torch.full((n, 2), 8.0),
                                group_size=128)
    nibbles = _unpack(state.packed, n, k, state.layout)
    packed64 = _pack_interleaved(nibbles, 64)
    assert torch.equal(_unpack(packed64, n, k, (64, True)), nibbles)
    x = torch.randn(2, k)
    y = native.int4_gemv(x, packed64, state.scales_and_zeros, state.kernel_group_size, 64,
                         None, n)
    ref = x @ dequantize_int4_weight(state).T
    assert _rel_err(y, ref) < 2e-4


@needs_native
@pytest.mark.parametrize("k", [12, 64, 288, 576, 768, 1536, 4096])
def test_native_rotation_matches_the_reference(k: int) -> None:
    """The rotation of ``lowbit_rot_*_gemv`` (seen through an identity int8 weight): dense
    Paley factors as multiply-adds (with 2 or 4 entries after their axis on the narrow
    vector path: 576 = 12 x 12 x 4, 288 = 12 x 12 x 2), Sylvester factors (merged: 1536 =
    12 x 128, 4096 = one 4096) as Walsh-Hadamard butterflies; equal to
    ``formats.rotation.rotate`` in float64, for one row and several."""
    from lowbit.formats.rotation import hadamard_factors, rotate

    _, sizes, _ = native.factor_args(hadamard_factors(k))
    assert sum(1 for s in sizes.tolist() if s < 0) <= 1  # neighbouring Sylvester merged
    assert sizes.tolist() == {576: [12, 12, -4], 288: [12, 12, -2],
                              1536: [12, -128]}.get(k, sizes.tolist())
    eye = torch.eye(k, dtype=torch.int8)
    f = native.int8_decoder(eye, torch.ones(k), None, k, k, lambda x: rotate(x),
                            hadamard_factors(k))
    for rows in (1, 5):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k + rows))
        torch.testing.assert_close(f(x), rotate(x.double()).float(), atol=2e-6, rtol=1e-5)


def _pack(nibbles: torch.Tensor, block: int, interleaved: bool) -> torch.Tensor:
    """Any ``int4pack`` layout (``int4_weight._unpack``'s inverse): full interleaved blocks,
    then pair blocks (byte j = row 2j | row 2j + 1 << 4) of ``block`` rows or the rest."""
    n, k = nibbles.shape
    full = n // block if interleaved else 0
    parts = [_pack_interleaved(nibbles[: full * block], block).reshape(-1)] if full else []
    for r0 in range(full * block, n, block):
        b = nibbles[r0:r0 + block].T  # [k, rows]
        parts.append((b[:, 0::2] | (b[:, 1::2] << 4)).contiguous().reshape(-1))
    return torch.cat(parts).view(n, k // 2)


@needs_native
@pytest.mark.parametrize("layout", [(64, True), (32, True), (32, False)])
@pytest.mark.parametrize("signed", [False, True])
def test_int4_dequant_equals_the_torch_dequantization(layout, signed) -> None:
    """Prefill's weight: bit-identical to ``_dequantize_padded`` (and its bf16 rounding) in
    every layout, tails included (100 rows: one full 64-row block and a 36-row pair block)."""
    import dataclasses

    from lowbit.kernels.int4_weight import _dequantize_padded, _unpack

    n, k, group = 100, 192, 64
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    zero = None if signed else torch.randint(0, 16, (n, k // group), generator=gen).float()
    state = prepare_int4_weight(q.to(torch.int8) - 8 if signed else q,
                                torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3, zero,
                                group_size=group)
    nibbles = _unpack(state.packed, state.packed.shape[0], k, state.layout)
    state = dataclasses.replace(state, packed=_pack(nibbles, *layout), layout=layout)
    want = _dequantize_padded(state)
    for dtype in (torch.float32, torch.bfloat16):
        got = native.int4_dequant(state.packed, state.scales_and_zeros,
                                  state.kernel_group_size, layout, dtype)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))
