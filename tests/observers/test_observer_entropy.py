"""Entropy (KL) calibration: clips outliers, keeps uniform data, matches a direct KL."""

import math

import pytest
import torch

from lowbit.formats import Granularity, qparams_from_range, quantize
from lowbit.observers import HistogramKLObserver, ObserverError


def gaussian_with_outliers(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:20] = torch.linspace(-60.0, 60.0, 20)
    return x


def test_kl_clips_outliers():
    x = gaussian_with_outliers()
    obs = HistogramKLObserver("int8")
    for b in x.split(50_000):
        obs.update(b)
    lo, hi = obs.compute_range()
    assert hi == -lo
    assert 2.0 < hi.item() < 0.5 * x.abs().max().item()


def test_kl_keeps_uniform_data_unclipped():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100_000, generator=g) * 2 - 1
    obs = HistogramKLObserver("int8")
    obs.update(x)
    assert obs.compute_range()[1].item() > 0.9


def test_kl_asymmetric_on_relu_data():
    x = gaussian_with_outliers().relu()
    obs = HistogramKLObserver("uint8", symmetric=False)
    obs.update(x)
    lo, hi = obs.compute_range()
    assert lo.item() == 0.0 and hi.item() < 0.5 * x.max().item()
    assert obs.compute().zero_point.item() == 0


def direct_kl(h, bins, w, i, fmt, symmetric, lo_obs, hi_obs):
    """KL(P || Q) built bin by bin, as the module docstring describes."""
    ref = h.clone()
    ref[:, i:] = 0
    for side in range(2):
        ref[side, i - 1] += h[side, i:].sum()
    amax = float(max(-lo_obs, hi_obs))
    t = min(i * w, amax)
    lo, hi = (-t, t) if symmetric else (max(lo_obs, -t), min(hi_obs, t))
    qp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), fmt, symmetric=symmetric)
    centres = torch.stack([-(torch.arange(bins) + 0.5), torch.arange(bins) + 0.5]) * w
    codes = quantize(centres.float(), qp)
    q = torch.zeros_like(h)
    for code in codes[:, :i].unique():
        members = (codes == code) & (h > 0)
        members[:, i:] = False
        if members.any():
            q[members] = h[members].sum() / members.sum()
    p_, q_ = ref / ref.sum(), q / q.sum()
    if ((p_ > 0) & (q_ == 0)).any():
        return math.inf
    m = p_ > 0
    return float((p_[m] * (p_[m] / q_[m]).log()).sum())


@pytest.mark.parametrize("fmt, symmetric", [("int4", True), ("uint4", False), ("int8", True)])
def test_divergences_match_a_direct_computation(fmt, symmetric):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, generator=g) * 2 + 0.7
    x[:3] = torch.tensor([14.0, -9.0, 11.0])
    obs = HistogramKLObserver(fmt, symmetric=symmetric, bins=64, start_bin=4)
    obs.update(x)
    thresholds, kls = obs.divergences(0)
    hist = obs.histogram
    h = hist.counts[0].double()
    w = float(hist.width[0, 0])
    for k, t in enumerate(thresholds.tolist()):
        i = 4 + k
        assert t == pytest.approx(min(i * w, 14.0))
        expected = direct_kl(h, 64, w, i, fmt, symmetric, x.min().item(), x.max().item())
        if math.isinf(expected):
            assert math.isinf(kls[k])
        else:
            assert float(kls[k]) == pytest.approx(expected, rel=1e-7, abs=1e-10)


def test_kl_per_channel_and_cap():
    torch.manual_seed(0)
    x = torch.randn(5000, 3)
    x[0, 1] = 40.0
    obs = HistogramKLObserver("int8", Granularity.per_channel(-1), stride=4)
    obs.update(x)
    t = obs.thresholds()
    assert t.shape == (3,) and t[1] < 20.0
    with pytest.raises(ObserverError, match="max_params"):
        HistogramKLObserver("int8", "channel:0", max_params=2).update(torch.randn(3, 4))
