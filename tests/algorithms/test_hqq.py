"""HQQ: never worse than RTN in weight MSE, float zero-points, options, errors."""

import pytest
import torch

from lowbit.algorithms import HQQ, AlgorithmError, hqq, rtn
from lowbit.formats import WeightSpec, dequantize, mse, quantize

from ._algo_data import make_layer


@pytest.mark.parametrize("fmt", ["uint4", "uint3", "int4"])
@pytest.mark.parametrize("gran", ["group:64", "channel"])
def test_weight_mse_not_worse_than_rtn(layer, fmt, gran):
    W, _ = layer
    cfg = WeightSpec(fmt, gran, symmetric=False)
    base = mse(W, rtn(W, cfg).dequantize())
    result = hqq(W, cfg)
    assert mse(W, result.dequantize()) < 0.98 * base
    assert result.info["weight_sse"] <= result.info["weight_sse_rtn"]


def test_zero_point_is_float_and_consistent(layer):
    W, _ = layer
    result = hqq(W, WeightSpec("uint4", "group:64", symmetric=False))
    zp = result.qparams.zero_point
    assert zp.dtype == torch.float32 and zp.shape == (64, 4)
    assert not torch.equal(zp, zp.round())  # HQQ moved it off the integer grid
    assert torch.equal(quantize(W, result.qparams), result.codes)
    assert torch.equal(result.dequantize(), dequantize(result.codes, result.qparams))


def test_round_zero_keeps_integer_zero_points(layer):
    W, _ = layer
    cfg = WeightSpec("uint4", "group:64", symmetric=False)
    result = hqq(W, cfg, round_zero=True)
    assert result.qparams.zero_point.dtype == torch.uint8
    assert mse(W, result.dequantize()) <= mse(W, rtn(W, cfg).dequantize())


def test_optimize_scale_and_partial_groups():
    W, _ = make_layer(out=16, k=200)
    cfg = WeightSpec("uint3", "group:64", symmetric=False, scale_dtype="fp16")
    zero_only = hqq(W, cfg)
    both = hqq(W, cfg, optimize_scale=True)
    assert both.qparams.scale.dtype == torch.float16 and both.qparams.scale.shape == (16, 4)
    assert mse(W, both.dequantize()) <= mse(W, zero_only.dequantize())


def test_errors(layer):
    W, _ = layer
    with pytest.raises(AlgorithmError, match="symmetric=False"):
        hqq(W, WeightSpec("int4", "channel", symmetric=True))
    with pytest.raises(AlgorithmError, match="lp_norm"):
        HQQ(lp_norm=2.0)
    with pytest.raises(AlgorithmError, match="e8m0"):
        hqq(W, WeightSpec("uint4", "group:32", False, "e8m0"), optimize_scale=True)
