"""Hadamard rotations: spread outlier channels evenly before quantizing.

An orthogonal ``H`` (``H @ H.T = I``) leaves a linear layer's output unchanged when both its
input and its weight are rotated, ``y = x W^T = (x H)(W H)^T``, while a channel that is 100x
larger than the rest in ``x`` becomes ``n`` channels of similar size in ``x H``. Quantizing
``x H`` per token and ``W H`` per channel then loses far less than quantizing ``x`` and
``W`` ("incoherence processing": QuIP, Chee et al., 2023, sec. 3; QuaRot, Ashkboos et al.,
2024, sec. 3, which applies Hadamard rotations online for W4A4/W8A8).

``H`` is the normalized Kronecker product ``(H_12 ⊗ ... ⊗ H_12 ⊗ H_{2^k}) / sqrt(n)`` of
Paley's order-12 matrix (Paley, 1933: ``q = 11``, ``q ≡ 3 mod 4``) and Sylvester's ``2^k``,
so every ``n = 12^a · 2^k`` has one: 576 = 12·12·4 and 1536 = 12·128 (SmolLM2), 4096 = 2^12.
``rotate`` applies it factor by factor (``O(n · sum of factor sizes)`` per row instead of
``O(n^2)``): for a row reshaped to the factors' grid, ``x (A ⊗ B) = A^T X B``.
"""

from __future__ import annotations

import functools
import math

import torch

from lowbit.formats.base import FormatError

ROTATIONS = ("hadamard",)
_MAX_SYLVESTER = 64


def _normal_tensors(build):
    """Cached factors are built as normal tensors even when first asked for inside
    ``torch.inference_mode`` (calibration): an inference tensor in the cache would break
    every later forward that autograd records ("Inference tensors cannot be saved for
    backward")."""
    return functools.wraps(build)(torch.inference_mode(False)(build))


@functools.cache
@_normal_tensors
def _paley12() -> torch.Tensor:
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)],
                              dtype=torch.float64)
    h = torch.empty(12, 12, dtype=torch.float64)
    h[0, :] = 1
    h[1:, 0] = -1
    h[1:, 1:] = jacobsthal + torch.eye(q, dtype=torch.float64)
    return h


@functools.cache
@_normal_tensors
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.cache
@_normal_tensors
def hadamard_factors(n: int) -> tuple[torch.Tensor, ...]:
    """Normalized orthogonal factors (float64) whose Kronecker product is ``H_n``; the last
    factor is the Sylvester one. Raises ``FormatError`` when ``n`` is not ``12^a · 2^k``."""
    rest, twelves = n, 0
    while rest % 12 == 0 and rest & (rest - 1):
        rest //= 12
        twelves += 1
    if n < 1 or rest & (rest - 1):
        raise FormatError(
            f"no Hadamard rotation of size {n}: lowbit builds them for 12^a * 2^k features "
            f"(e.g. 576, 768, 1536, 4096); use a recipe without rotation for this layer"
        )
    factors = [_paley12() / math.sqrt(12)] * twelves
    while rest > 1 or not factors:  # Sylvester factors of at most 64 (H_2^a ⊗ H_2^b)
        size = min(rest, _MAX_SYLVESTER)
        factors.append(_sylvester(size) / math.sqrt(size))
        rest //= size
    return tuple(factors)


def is_sylvester(f: torch.Tensor) -> bool:
    """True when ``f`` is the normalized Sylvester matrix of its size (a power of two)."""
    n = f.shape[0]
    return (f.dim() == 2 and f.shape[1] == n and n & (n - 1) == 0
            and torch.equal(f.double(), _sylvester(n) / math.sqrt(n)))


def has_hadamard(n: int) -> bool:
    try:
        hadamard_factors(n)
    except FormatError:
        return False
    return True


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``[n, n]`` orthogonal matrix (for tests and weight rotation)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in hadamard_factors(n):
        h = torch.kron(h, f)
    return h.to(dtype)


#: ``rotate`` merges neighbouring factors up to this size (H_12 ⊗ H_4 = one 48 x 48): fewer,
#: wider matmuls and fewer copies, for a few more multiply-adds per entry
_MERGE_UP_TO = 128


@functools.cache
@_normal_tensors
def _factors_as(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    merged: list[torch.Tensor] = []
    for f in reversed(hadamard_factors(n)):
        if merged and merged[0].shape[0] * f.shape[0] <= _MERGE_UP_TO:
            merged[0] = torch.kron(f, merged[0])
        else:
            merged.insert(0, f)
    return tuple(f.to(dtype) for f in merged)


def check_rotation(kind: str | None) -> None:
    if kind is not None and kind not in ROTATIONS:
        raise FormatError(f"unknown rotation {kind!r}; use one of {ROTATIONS} or None")


def rotate(x: torch.Tensor, kind: str = "hadamard", *, inverse: bool = False) -> torch.Tensor:
    """``x @ H`` (``x @ H.T`` when ``inverse``) along the last dimension, in ``x``'s dtype."""
    check_rotation(kind)
    n = x.shape[-1]
    factors = _factors_as(n, x.dtype)
    if inverse:
        factors = tuple(f.T for f in factors)
    if len(factors) == 1:
        return x @ factors[0]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    rows = y.shape[0]
    if len(factors) == 2:  # x (A ⊗ B) = A^T X B on each row's [a, b] grid: two matmuls
        a, b = factors
        grid = (y.reshape(-1, b.shape[0]) @ b).reshape(rows, a.shape[0], b.shape[0])
        return (a.T @ grid).reshape(*lead, n)
    for f in reversed(factors):
        # the grid's last axis belongs to ``f``: contract it (one contiguous matmul), then
        # move it to the front, so the next factor's axis is last; after every factor the
        # axes are back in order. (Contracting axes in place with ``movedim`` ran 5-10x
        # slower: strided batched matmuls.)
        s = f.shape[0]
        y = (y.reshape(-1, s) @ f).reshape(rows, n // s, s).transpose(1, 2).reshape(rows, n)
    return y.reshape(*lead, n)
