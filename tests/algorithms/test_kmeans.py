"""k-means / Lloyd-Max weight sharing: SQNR, layout of the result, weighting, determinism."""

import pytest
import torch

from lowbit.algorithms import AlgorithmError, KMeans, kmeans, rtn
from lowbit.formats import WeightSpec, sqnr_db


@pytest.fixture
def gaussian():
    return torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init", ["companded", "quantile", "kmeans++"])
def test_gaussian_4bit_near_lloyd_max(gaussian, init):
    result = kmeans(gaussian, 4, "channel", init=init)
    snr = sqnr_db(gaussian, result.dequantize())
    assert snr >= 19.5  # Lloyd-Max on N(0, 1) with 16 levels: 20.2 dB
    assert snr > sqnr_db(gaussian, rtn(gaussian, WeightSpec("int4", "channel")).dequantize())
    assert result.info["iters"] <= 25


def test_result_layout(gaussian):
    result = kmeans(gaussian[:, :200], 3, "group:64")
    assert result.codes.dtype == torch.uint8 and result.codes.shape == (64, 200)
    assert int(result.codes.max()) < 8
    assert result.centroids.shape == (64, 4, 8)
    assert torch.all(result.centroids.diff(dim=-1) >= 0)  # sorted: ready to be a codebook
    assert sqnr_db(gaussian[:, :200], result.dequantize()) > 14.0


def test_importance_weighting_lowers_the_weighted_error(gaussian):
    W = gaussian[:16]
    imp = torch.ones(1024)
    imp[:64] = 100.0  # a few important input channels (Hessian diagonal, SqueezeLLM)
    weighted = kmeans(W, 3, "channel", importance=imp)
    plain = kmeans(W, 3, "channel")

    def err(r):
        return float((imp * (W - r.dequantize()) ** 2).sum())

    assert err(weighted) < 0.8 * err(plain)


def test_deterministic(gaussian):
    a = kmeans(gaussian[:8], 2, init="kmeans++", seed=3)
    b = kmeans(gaussian[:8], 2, init="kmeans++", seed=3)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.centroids, b.centroids)


def test_few_distinct_values_and_errors():
    W = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 2.0]] * 2)
    result = kmeans(W, 3, "channel", init="kmeans++")
    assert torch.equal(result.dequantize(), W)
    with pytest.raises(AlgorithmError, match="1 to 8 bits"):
        KMeans(bits=9)
    with pytest.raises(AlgorithmError, match="importance"):
        kmeans(W, 2, importance=-torch.ones(6))
