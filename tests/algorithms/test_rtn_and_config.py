"""Config, results, RTN and the Hessian accumulator."""

import pytest
import torch

from lowbit.algorithms import (
    AlgorithmError,
    CodebookResult,
    HessianAccumulator,
    QuantResult,
    rtn,
)
from lowbit.formats import FormatError, Granularity, WeightSpec, dequantize, quantize_tensor


def test_config_parses_and_validates():
    cfg = WeightSpec("int4", "group:128")
    assert cfg.fmt.bits == 4 and cfg.group_size == 128 and cfg.granularity.kind == "group"
    assert WeightSpec("int8", "channel").granularity == Granularity.per_channel(0)
    assert WeightSpec("int8", "channel") == WeightSpec("int8", Granularity.per_channel(0))
    with pytest.raises(FormatError, match="unknown format"):
        WeightSpec("int99")
    with pytest.raises(FormatError, match="granularity"):
        WeightSpec("int4", "token")
    with pytest.raises(FormatError, match="unsigned"):
        WeightSpec("uint4", "group:64", symmetric=True)
    with pytest.raises(FormatError, match="scale dtype"):
        WeightSpec("int4", scale_dtype="fp64")


@pytest.mark.parametrize("gran", ["tensor", "channel", "group:64", "group:48"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_the_format_layer(layer, gran, symmetric):
    W, _ = layer
    fmt = "int4" if symmetric else "uint4"
    result = rtn(W, WeightSpec(fmt, gran, symmetric))
    codes, qp = quantize_tensor(W, fmt, Granularity.parse(gran), symmetric=symmetric)
    assert torch.equal(result.codes, codes) and result.codes.dtype == qp.format.code_dtype
    assert torch.equal(result.dequantize(), dequantize(codes, qp))


def test_effective_weight_undoes_the_input_scale(layer):
    W, _ = layer
    s = torch.linspace(0.5, 2.0, W.shape[1])
    base = rtn(W * s, WeightSpec("int8", "channel"))
    result = QuantResult(base.codes, base.qparams, input_scale=s)
    assert torch.allclose(result.effective_weight(), base.dequantize() / s)


def test_rtn_rejects_bad_weights():
    with pytest.raises(AlgorithmError, match="2-D"):
        rtn(torch.randn(8), WeightSpec("int4", "group:128"))
    with pytest.raises(AlgorithmError, match="NaN"):
        rtn(torch.full((2, 4), float("nan")), WeightSpec("int4", "channel"))


def test_hessian_accumulator_is_a_running_mean(layer):
    _, X = layer
    acc = HessianAccumulator(X.shape[1], dtype=torch.float64)
    for chunk in (X[:100], X[100:101], X[101:].reshape(3, 137, X.shape[1])):
        acc.add_batch(chunk)
    expected = 2 / X.shape[0] * X.double().T @ X.double()
    assert acc.nsamples == X.shape[0]
    assert torch.allclose(acc.H, expected)
    assert torch.allclose(acc.mean_square, X.double().pow(2).mean(0))
    with pytest.raises(AlgorithmError, match="last dimension 256"):
        acc.add_batch(torch.randn(4, 3))


def test_hessian_panels_match_the_full_product_and_catch_non_finite_inputs():
    torch.manual_seed(0)
    X = torch.randn(700, 577)  # wide enough for panels, not a multiple of their count
    acc = HessianAccumulator(577)
    acc.add_batch(X[:300])
    first = acc.H.clone()  # read between batches: the next batch must still land
    acc.add_batch(X[300:])
    assert torch.allclose(first, 2 / 300 * X[:300].T @ X[:300], rtol=1e-5, atol=1e-5)
    assert torch.equal(acc.H, acc.H.T)
    assert torch.allclose(acc.H, 2 / 700 * X.T @ X, rtol=1e-5, atol=1e-5)
    X[5, 17] = float("inf")
    bad = HessianAccumulator(577)
    bad.add_batch(X)
    with pytest.raises(AlgorithmError, match="NaN or Inf.*float64"):
        _ = bad.H


def test_codebook_result_dequantizes_partial_groups():
    codes = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.uint8)
    centroids = torch.tensor([[[-1.0, 1.0], [-2.0, 2.0]]])
    r = CodebookResult(codes, centroids, Granularity.per_group(3))
    assert r.dequantize().tolist() == [[-1.0, 1.0, 1.0, -2.0, 2.0]]
