"""SmoothQuant scales (eq. 4): balance, invariance, shared inputs."""

import pytest
import torch

from lowbit.algorithms import AlgorithmError, smoothquant_scales

from ._algo_data import make_layer


def test_alpha_half_balances_activation_and_weight_ranges(layer):
    W, X = layer
    s = smoothquant_scales(X.abs().amax(0), W, alpha=0.5)
    act = (X / s).abs().amax(0)
    wgt = (W * s).abs().amax(0)
    assert torch.allclose(act, wgt, rtol=1e-5)
    assert (X / s).abs().max() < 0.2 * X.abs().max()  # the x20 outliers are flattened
    assert torch.allclose((X / s) @ (W * s).T, X @ W.T, rtol=1e-4, atol=1e-3)


def test_alpha_extremes_move_all_range_to_one_side(layer):
    W, X = layer
    a = X.abs().amax(0)
    s1 = smoothquant_scales(a, W, alpha=1.0)
    assert torch.allclose((X / s1).abs().amax(0), torch.ones(256))
    s0 = smoothquant_scales(a, W, alpha=0.0)
    assert torch.allclose((W * s0).abs().amax(0), torch.ones(256))


def test_weights_sharing_an_input_share_one_scale():
    Wq, X = make_layer(out=32, seed=1)
    Wk, _ = make_layer(out=16, seed=2)
    a = X.abs().amax(0)
    s = smoothquant_scales(a, [Wq, 3 * Wk])
    expected = a.sqrt() / torch.maximum(Wq.abs().amax(0), 3 * Wk.abs().amax(0)).sqrt()
    assert torch.allclose(s, expected)


def test_dead_channels_and_errors(layer):
    W, X = layer
    a = X.abs().amax(0)
    a[0] = 0
    assert torch.isfinite(smoothquant_scales(a, W)).all()
    with pytest.raises(AlgorithmError, match="alpha"):
        smoothquant_scales(a, W, alpha=1.5)
    with pytest.raises(AlgorithmError, match=r"\[out, 256\]"):
        smoothquant_scales(a, W[:, :10])
