"""llama.cpp's rounding of a matmul's *input*: what its CPU backend does to the activations.

ggml's CPU backend never multiplies a quantized weight by float activations. Before each
matrix product it converts the activation rows to the weight type's ``vec_dot_type``
(``ggml-cpu.c``, ``type_traits_cpu``) and runs an integer dot product:

- Q8_0, Q4_0, Q5_0 (and the IQ4_NL family) weights: activations in **Q8_0**, blocks of 32,
  ``d = fp16(amax / 127)``, ``q = round(x / d)`` (``quantize_row_q8_0``);
- k-quant weights (Q2_K .. Q6_K): activations in **Q8_K**, blocks of 256, a float32 scale
  signed like the block's largest-magnitude value: ``iscale = -127 / max``, ``q =
  min(127, nearest(iscale * x))``, ``d = 1 / iscale`` (``quantize_row_q8_K_ref``).

F32 and F16 weights keep float (F16) activations, so a quantized GGUF file differs from its
F32 source by this input rounding as well as by its weights. The functions below return the
dequantized activations ``d * q`` (float32), the values llama.cpp's dot product sees.

``fake_quantize_q8_0`` follows ``quantize_row_q8_0_ref`` (``ggml-quants.c``; gguf-py's
``Q8_0``, bit for bit): ``id = 1 / d``, ties rounded away from zero. The x86 SIMD path that
llama.cpp runs multiplies by ``127 / amax`` and rounds ties to even; the two differ only
where ``x * id`` falls within an ulp of a half: one code step in a few values per million
(``tests/formats/test_ggml_activations.py`` calls llama.cpp's own library to check both).
``fake_quantize_q8_k`` follows ``quantize_row_q8_K_ref``, which the x86 backend calls as it
is. The divisions are rounded once, as in C, so both match the reference bit for bit.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import FormatError

#: values per block: Q8_0 (``QK8_0``) and Q8_K (``QK_K``)
QK8_0 = 32
QK8_K = 256

__all__ = ["QK8_0", "QK8_K", "fake_quantize_q8_0", "fake_quantize_q8_k"]


def _blocks(x: torch.Tensor, size: int, name: str) -> torch.Tensor:
    """``x`` as float32 rows of ``size`` values (a row never spans two input rows)."""
    if x.dim() == 0 or x.shape[-1] % size:
        width = x.shape[-1] if x.dim() else "a scalar"
        raise FormatError(f"{name} cuts each row of activations into blocks of {size}; the "
                          f"last dimension is {width}, not a multiple of {size} (llama.cpp "
                          f"cannot hold such a row in {name} either)")
    return x.float().reshape(-1, size)


def _divide(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """``numerator / t`` rounded once, as C divides (``numerator / t`` on a tensor is
    ``t.reciprocal() * numerator``, rounded twice)."""
    return torch.full_like(t, numerator).div(t)


def _round_away(y: torch.Tensor) -> torch.Tensor:
    """``roundf``: nearest integer, ties away from zero, exact for every float32 (as
    gguf-py's ``np_roundf``; ``floor(|y| + 0.5)`` is off by one at 0.49999997)."""
    a = y.abs()
    whole = a.floor()
    return torch.sign(y) * (whole + (2 * (a - whole)).floor())


def fake_quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to Q8_0 along its last dimension and dequantized, in ``x``'s shape
    (float32). An all-zero block stays zero."""
    blocks = _blocks(x, QK8_0, "Q8_0")
    d = blocks.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), _divide(1, d))
    q = _round_away(blocks * inv)
    return (q * d.half().float()).reshape(x.shape)


def fake_quantize_q8_k(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to Q8_K along its last dimension and dequantized, in ``x``'s shape
    (float32). ``nearest`` is ggml's ``nearest_int``: ties to even. An all-zero block stays
    zero."""
    blocks = _blocks(x, QK8_K, "Q8_K")
    signed_max = blocks.gather(1, blocks.abs().argmax(1, keepdim=True))  # first largest |x|
    zero = signed_max == 0
    iscale = _divide(-127, torch.where(zero, torch.ones_like(signed_max), signed_max))
    q = torch.round(iscale * blocks).clamp(max=127)
    d = torch.where(zero, torch.zeros_like(iscale), _divide(1, iscale))
    return (q * d).reshape(x.shape)
