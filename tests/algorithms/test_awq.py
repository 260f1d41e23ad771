"""AWQ: output error below RTN with outlier channels, the scale it returns, options."""

import pytest
import torch

from lowbit.algorithms import AWQ, AlgorithmError, awq, rtn
from lowbit.formats import WeightSpec

from ._algo_data import OUTLIERS, output_mse


@pytest.mark.parametrize("fmt", ["int3", "int4", "uint4"])
@pytest.mark.parametrize("gran", ["group:64", "channel"])
def test_output_error_below_rtn(layer, fmt, gran):
    W, X = layer
    cfg = WeightSpec(fmt, gran, symmetric=fmt.startswith("int"))
    result = awq(W, X, cfg)
    base = output_mse(W, X, rtn(W, cfg).dequantize())
    assert output_mse(W, X, result.effective_weight()) < 0.5 * base
    assert result.info["alpha"] > 0 and len(result.info["alpha_losses"]) == 20
    s = result.input_scale
    assert s.shape == (256,) and s[OUTLIERS].min() > s.median()  # salient channels scaled up
    assert result.info["output_mse"] == pytest.approx(
        output_mse(W, X, result.effective_weight()), rel=1e-4)


def test_codes_encode_the_scaled_weight(layer):
    W, X = layer
    result = awq(W, X, WeightSpec("int4", "group:64"), clip=False)
    again = rtn(W * result.input_scale, WeightSpec("int4", "group:64"))
    assert torch.equal(again.codes, result.codes)


def test_given_act_scale_and_tensor_granularity(layer):
    W, X = layer
    cfg = WeightSpec("int8", "tensor")
    result = awq(W, X, cfg, act_scale=X.abs().mean(0), n_grid=5)
    assert "clip_used" not in result.info
    assert output_mse(W, X, result.effective_weight()) <= output_mse(W, X, rtn(W, cfg).dequantize())


def test_partial_group_clip_search():
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(16, 200, generator=g), torch.randn(300, 200, generator=g)
    cfg = WeightSpec("uint4", "group:64", symmetric=False)
    result = awq(W, X, cfg, n_clip_tokens=100)
    assert result.qparams.scale.shape == (16, 4)
    assert output_mse(W, X, result.effective_weight()) <= output_mse(W, X, rtn(W, cfg).dequantize())


def test_errors(layer):
    W, X = layer
    cfg = WeightSpec("int4", "channel")
    with pytest.raises(AlgorithmError, match="last dimension 256"):
        awq(W, X[:, :10], cfg)
    with pytest.raises(AlgorithmError, match="act_scale"):
        awq(W, X, cfg, act_scale=torch.ones(3))
    with pytest.raises(AlgorithmError, match="max_shrink"):
        AWQ(max_shrink=1.5)
