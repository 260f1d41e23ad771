"""Importance-weighted (imatrix-style) range search: weighted error vs RTN, any int format."""

import pytest
import torch

from lowbit.algorithms import (
    AlgorithmError,
    HessianAccumulator,
    importance_rtn,
    rtn,
)
from lowbit.formats import WeightSpec

from ._algo_data import output_mse


def weighted_sse(W, w_hat, imp):
    return float((imp * (W - w_hat) ** 2).sum())


@pytest.mark.parametrize(("fmt", "symmetric"), [("int4", True), ("int3", True),
                                                ("uint4", False), ("int4", False)])
@pytest.mark.parametrize("gran", ["group:64", "channel", "group:48"])
def test_weighted_error_below_rtn(layer, fmt, symmetric, gran):
    W, X = layer
    acc = HessianAccumulator(256)
    acc.add_batch(X)
    imp = acc.mean_square
    cfg = WeightSpec(fmt, gran, symmetric)
    result = importance_rtn(W, imp, cfg)
    base = rtn(W, cfg).dequantize()
    assert weighted_sse(W, result.dequantize(), imp) < 0.9 * weighted_sse(W, base, imp)
    assert result.info["weighted_sse"] == pytest.approx(
        weighted_sse(W, result.dequantize(), imp), rel=1e-4)
    assert output_mse(W, X, result.dequantize()) < output_mse(W, X, base)


def test_per_weight_importance_and_errors(layer):
    W, _ = layer
    imp = torch.rand(W.shape, generator=torch.Generator().manual_seed(0))
    cfg = WeightSpec("int4", "group:64")
    result = importance_rtn(W, imp, cfg, refit=False, n_grid=5)
    assert weighted_sse(W, result.dequantize(), imp) <= weighted_sse(W, rtn(W, cfg).dequantize(),
                                                                     imp)
    with pytest.raises(AlgorithmError, match="importance must be"):
        importance_rtn(W, torch.ones(3), cfg)
    with pytest.raises(AlgorithmError, match="non-negative"):
        importance_rtn(W, -torch.ones(256), cfg)
