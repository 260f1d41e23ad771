"""GPTAQ's target weight: GPTQ against ``H`` on ``W'`` minimises ``||W X - Q X~||``."""

import pytest
import torch

from lowbit.algorithms import AlgorithmError
from lowbit.algorithms.gptaq import asymmetric_target
from lowbit.algorithms.gptq_solver import GPTQ
from lowbit.formats import WeightSpec, dequantize

from ._algo_data import make_layer


def _moments(X_q, X):
    n = len(X)
    return 2 * X_q.T @ X_q / n, 2 * X_q.T @ X / n


def test_same_inputs_leave_the_weight_as_it_is():
    W, X = make_layer(out=16, k=64, tokens=256, seed=1)
    H, C = _moments(X, X)
    torch.testing.assert_close(asymmetric_target(W, H, C), W, atol=1e-5, rtol=1e-5)


def test_target_is_the_least_squares_fit_to_the_float_outputs():
    """Undamped, ``W'`` is ``argmin ||W X - W' X~||``: the least-squares solution."""
    W, X = make_layer(out=16, k=64, tokens=512, seed=2)
    X_q = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(3))
    H, C = _moments(X_q, X)
    got = asymmetric_target(W, H, C, percdamp=0.0)
    want = torch.linalg.lstsq(X_q.double(), (X @ W.T).double()).solution.T.float()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_gptq_on_the_target_matches_the_float_outputs_better():
    """Inputs that drifted (as after quantized layers): quantizing ``W'`` lowers the error
    against the float model's outputs ``W X`` well below quantizing ``W`` itself."""
    W, X = make_layer(out=32, k=128, tokens=1024, seed=4)
    g = torch.Generator().manual_seed(5)
    X_q = X * (1 + 0.2 * torch.randn(X.shape[1], generator=g)) + 0.2 * torch.randn(
        X.shape, generator=g)
    H, C = _moments(X_q, X)
    cfg = WeightSpec("uint4", "group:32", symmetric=False)
    gptq = GPTQ(act_order=True)

    def error(target):
        res = gptq.quantize(target, H, cfg)
        return float((X @ W.T - X_q @ dequantize(res.codes, res.qparams).T).pow(2).mean())

    assert error(asymmetric_target(W, H, C)) < 0.7 * error(W)


def test_shapes_are_checked():
    W, X = make_layer(out=8, k=32, tokens=64)
    H, _ = _moments(X, X)
    with pytest.raises(AlgorithmError, match="GPTAQ needs H and C"):
        asymmetric_target(W, H, H[:16, :16])
