"""Hadamard rotations: orthogonal, fast application equals the dense matrix, and they do
what they are for (spread an outlier channel so int8 per-token quantization loses less)."""

import pytest
import torch

from lowbit.formats import FormatError, hadamard_matrix, has_hadamard, rotate
from lowbit.formats.rotation import hadamard_factors


@pytest.mark.parametrize("n", [1, 2, 12, 48, 64, 96, 576, 768, 1536])
def test_orthogonal_and_fast_path_equals_dense(n):
    h = hadamard_matrix(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))  # a Hadamard matrix
    x = torch.randn(5, 3, n, dtype=torch.float64)
    assert torch.allclose(rotate(x), x @ h)
    assert torch.allclose(rotate(rotate(x), inverse=True), x)


def test_large_powers_of_two_use_small_factors():
    assert [f.shape[0] for f in hadamard_factors(4096)] == [64, 64]
    x = torch.randn(2, 4096, dtype=torch.float64)
    assert torch.allclose(rotate(rotate(x), inverse=True), x)
    assert torch.allclose(rotate(x).norm(dim=-1), x.norm(dim=-1))


def test_sizes_without_a_construction_are_refused_clearly():
    assert not has_hadamard(100) and has_hadamard(576)
    with pytest.raises(FormatError, match="12\\^a \\* 2\\^k"):
        rotate(torch.randn(2, 100))
    with pytest.raises(FormatError, match="unknown rotation"):
        rotate(torch.randn(2, 64), "givens")


def test_rotation_spreads_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=g)
    x[:, 7] *= 100  # one massive channel, as in LLM activations

    def int8_token_error(v):
        scale = v.abs().amax(-1, keepdim=True) / 127
        return ((torch.round(v / scale) * scale - v) ** 2).mean()

    plain, rotated = int8_token_error(x), int8_token_error(rotate(x))
    assert rotated < plain / 20  # the rotation is orthogonal: errors compare directly


def test_factors_first_built_in_inference_mode_work_under_autograd():
    from lowbit.formats import rotation

    for cached in (rotation._paley12, rotation._sylvester, rotation.hadamard_factors,
                   rotation._factors_as):
        cached.cache_clear()
    with torch.inference_mode():  # calibration asks first
        rotation.rotate(torch.randn(2, 96))
    x = torch.randn(2, 96, requires_grad=True)
    rotation.rotate(x).sum().backward()  # a later forward that autograd records
    assert x.grad is not None and x.grad.shape == x.shape
