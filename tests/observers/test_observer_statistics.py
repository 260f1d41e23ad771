"""Streaming histogram, percentile and mean +- k std observers against direct computations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.observers import MeanStdObserver, PercentileObserver, StreamingHistogram

values = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def batch_lists(draw, max_batches=5, max_len=40):
    """1-D float32 batches whose scales differ a lot, so histograms must grow."""
    out = []
    for _ in range(draw(st.integers(1, max_batches))):
        xs = draw(st.lists(values, min_size=1, max_size=max_len))
        scale = draw(st.sampled_from([1e-3, 1.0, 7.0, 300.0]))
        out.append(torch.tensor(xs, dtype=torch.float32) * scale)
    return out


def direct_histogram(x: torch.Tensor, edge: float, bins: int) -> torch.Tensor:
    """What the streaming histogram claims to equal: the histogram of all data at its edge."""
    mag = x.double().abs()
    if edge == 0:
        idx = torch.zeros_like(mag)
    else:
        idx = (torch.ceil(mag / edge * bins) - 1).clamp(0, bins - 1)
    return torch.bincount(idx.long(), minlength=bins)


@settings(max_examples=40, deadline=None)
@given(batch_lists(), st.sampled_from([2, 8, 64]), st.booleans())
def test_growing_histogram_is_exact(xs, bins, shared):
    hist = StreamingHistogram(bins, shared_edge=shared)
    for x in xs:
        hist.add(x.reshape(1, -1))
    data = torch.cat(xs)
    neg, pos = data[data < 0], data[data >= 0]
    for side, part in ((0, neg), (1, pos)):
        edge = float(hist.edge[0, side])
        assert torch.equal(hist.counts[0, side], direct_histogram(part, edge, bins))
        amax = float(part.abs().max()) if part.numel() else 0.0
        assert float(hist.amax[0, side]) == amax
        if not shared:  # the documented bound on the bin width
            assert amax <= edge < 2 * amax or edge == amax


@settings(max_examples=40, deadline=None)
@given(batch_lists(), st.floats(90.0, 100.0), st.booleans())
def test_percentile_within_documented_bound(xs, percentile, symmetric):
    fmt = "int8" if symmetric else "uint8"
    obs = PercentileObserver(fmt, symmetric=symmetric, percentile=percentile, bins=256)
    for x in xs:
        obs.update(x)
    data = torch.cat(xs).double()
    w = float(obs.error_bound()) * (1 + 1e-6) + 1e-30
    q = percentile / 100
    lo, hi = obs.compute_range()

    def check(est, values, q):
        lower = torch.quantile(values, q, interpolation="lower").item()
        higher = torch.quantile(values, q, interpolation="higher").item()
        assert lower - w <= float(est) <= higher + w
        assert values.min() <= float(est) <= values.max()

    if symmetric:
        check(hi, data.abs(), q)
        assert lo == -hi
    else:
        check(lo, data, 1 - q)
        check(hi, data, q)
    assert float(obs.error_bound()) <= 2 * float(data.abs().max()) / 256


def test_percentile_clips_rare_outliers():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[:5] = 80.0
    obs = PercentileObserver("int8", percentile=99.9)
    for b in x.split(10_000):
        obs.update(b)
    lo, hi = obs.compute_range()
    true = torch.quantile(x.abs(), 0.999).item()
    assert hi.item() == pytest.approx(true, abs=float(obs.error_bound()))
    assert hi.item() < 5.0


def test_percentile_per_channel_bound_shape():
    obs = PercentileObserver("int8", "channel:-1")
    obs.update(torch.randn(4, 7, 3))
    assert obs.error_bound().shape == (3,)
    assert obs.compute().scale.shape == (3,)


@settings(max_examples=40, deadline=None)
@given(batch_lists(), st.floats(0.5, 6.0))
def test_meanstd_streaming_equals_direct(xs, k):
    obs = MeanStdObserver("uint8", symmetric=False, k=k, clip_to_observed=False)
    for x in xs:
        obs.update(x)
    data = torch.cat(xs).double()
    mean, std = data.mean(), data.std(correction=0)
    scale = float(data.abs().max()) + 1e-30
    assert float(obs.mean) == pytest.approx(float(mean), abs=1e-12 * scale)
    assert float(obs.std) == pytest.approx(float(std), abs=1e-9 * scale)
    lo, hi = obs.compute_range()
    torch.testing.assert_close(
        lo.double(), (mean - k * std).reshape(()), rtol=1e-6, atol=1e-6 * scale
    )
    torch.testing.assert_close(
        hi.double(), (mean + k * std).reshape(()), rtol=1e-6, atol=1e-6 * scale
    )


def test_meanstd_per_channel_and_clipping():
    torch.manual_seed(0)
    xs = [torch.randn(5, 3) * torch.tensor([1.0, 10.0, 0.1]) for _ in range(4)]
    obs = MeanStdObserver("int8", "channel:-1", k=2.0)
    for x in xs:
        obs.update(x)
    data = torch.cat(xs).double()
    mean, std = data.mean(0), data.std(0, correction=0)
    lo = torch.maximum(mean - 2 * std, data.amin(0))
    hi = torch.minimum(mean + 2 * std, data.amax(0))
    got_lo, got_hi = obs.compute_range()
    torch.testing.assert_close(got_lo, lo.float())
    torch.testing.assert_close(got_hi, hi.float())
    wide = MeanStdObserver("int8", k=100.0)
    wide.update(data[:, 0].float())
    assert wide.compute_range()[1] == data[:, 0].float().max()  # clipped to what was seen


def test_meanstd_ignores_ragged_group_padding():
    w = torch.arange(1.0, 11.0).reshape(2, 5)  # groups of 4: the last holds one real value
    obs = MeanStdObserver("int8", "group:4", k=1.0, clip_to_observed=False)
    obs.update(w)
    assert obs.count.tolist() == [4, 1, 4, 1]
    torch.testing.assert_close(obs.mean.float(), torch.tensor([2.5, 5.0, 7.5, 10.0]))
    assert float(obs.std[1]) == 0.0
