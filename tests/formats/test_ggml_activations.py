"""llama.cpp's activation rounding (Q8_0, Q8_K): bit for bit against gguf-py and, where
llama.cpp's libraries are built (scripts/build_llama_cpp.sh), against ggml's own C."""

import ctypes

import numpy as np
import pytest
import torch

from lowbit.formats import FormatError
from lowbit.formats.ggml_activations import (
    QK8_0,
    QK8_K,
    fake_quantize_q8_0,
    fake_quantize_q8_k,
)


def _activations(rows: int = 64, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, with outliers, one all-zero block and one block
    of a single value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).mul(20)
    x[::7, 5] *= 50  # outliers, as in a transformer's residual stream
    x[1, :QK8_K] = 0
    x[2, QK8_K: 2 * QK8_K] = -0.75
    return x


def test_q8_0_matches_gguf_py_bit_for_bit():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    x = _activations()
    ref = dequantize(quantize(x.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    out = fake_quantize_q8_0(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, torch.from_numpy(ref))
    assert torch.equal(out[1, :QK8_K], torch.zeros(QK8_K))  # a zero block stays zero


@pytest.mark.parametrize("fn", [fake_quantize_q8_0, fake_quantize_q8_k])
def test_codes_are_integers_within_half_a_step(fn):
    size = QK8_0 if fn is fake_quantize_q8_0 else QK8_K
    x = _activations(seed=1)
    out = fn(x).reshape(-1, size)
    blocks = x.reshape(-1, size)
    step = blocks.abs().amax(1, keepdim=True) / 127
    d = step.half().float() if size == QK8_0 else step  # Q8_0 stores d in float16
    keep = step[:, 0] > 0
    q = out[keep] / d[keep]
    assert (q - q.round()).abs().max() < 1e-3 and q.abs().max() <= 127.001
    # half a step, plus (for Q8_0) up to 127 times float16's rounding of d
    assert ((out - blocks)[keep].abs() <= 0.57 * step[keep]).all()
    assert torch.equal(fn(torch.zeros(3, size)), torch.zeros(3, size))


@pytest.mark.parametrize("fn, size", [(fake_quantize_q8_0, QK8_0), (fake_quantize_q8_k, QK8_K)])
def test_a_row_that_is_not_whole_blocks_is_refused(fn, size):
    with pytest.raises(FormatError, match=f"multiple of {size}"):
        fn(torch.randn(4, size + 8))
    with pytest.raises(FormatError):
        fn(torch.tensor(1.0))
    assert fn(torch.randn(2, 3, 2 * size)).shape == (2, 3, 2 * size)  # any leading dims


# -- against llama.cpp's own library ---------------------------------------------------------
def _ggml():
    from lowbit.export.llama_cpp_tools import tool_dir

    base, cpu = tool_dir() / "libggml-base.so", tool_dir() / "libggml-cpu.so"
    if not (base.is_file() and cpu.is_file()):
        pytest.skip("llama.cpp's libraries are not built (scripts/build_llama_cpp.sh)")
    base, cpu = ctypes.CDLL(str(base)), ctypes.CDLL(str(cpu))
    cpu.ggml_cpu_init()
    return base, cpu


#: block bytes: Q8_0 = fp16 d + 32 int8; Q8_K = float d + 256 int8 + 16 int16 sums
_BYTES = {"q8_0": (QK8_0, 34), "q8_K": (QK8_K, 292)}


def _round_trip(lib, base, quantize: str, kind: str, x: torch.Tensor) -> torch.Tensor:
    size, nbytes = _BYTES[kind]
    flat = np.ascontiguousarray(x.numpy().ravel(), dtype=np.float32)
    blocks = (ctypes.c_uint8 * (flat.size // size * nbytes))()
    getattr(lib, quantize)(flat.ctypes.data_as(ctypes.c_void_p), blocks,
                           ctypes.c_int64(flat.size))
    out = np.empty_like(flat)
    getattr(base, f"dequantize_row_{kind}")(blocks, out.ctypes.data_as(ctypes.c_void_p),
                                            ctypes.c_int64(flat.size))
    return torch.from_numpy(out).reshape(x.shape)


def test_q8_k_matches_ggml_bit_for_bit():
    base, cpu = _ggml()
    x = _activations(seed=2)
    out = fake_quantize_q8_k(x)
    assert torch.equal(out, _round_trip(base, base, "quantize_row_q8_K_ref", "q8_K", x))
    assert torch.equal(out, _round_trip(cpu, base, "quantize_row_q8_K", "q8_K", x))


def test_q8_0_matches_ggml_reference_and_nearly_its_simd_path():
    base, cpu = _ggml()
    x = _activations(rows=512, seed=3)
    out = fake_quantize_q8_0(x)
    assert torch.equal(out, _round_trip(base, base, "quantize_row_q8_0_ref", "q8_0", x))
    simd = _round_trip(cpu, base, "quantize_row_q8_0", "q8_0", x)  # what llama.cpp runs
    differ = out != simd
    assert differ.float().mean() < 1e-4
    step = x.reshape(-1, QK8_0).abs().amax(1, keepdim=True).expand(-1, QK8_0) / 127
    assert ((out - simd).abs().reshape(-1, QK8_0) <= step * 1.01).all()
