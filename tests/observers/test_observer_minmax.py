"""Min/max, absmax and moving-average observers: streaming equals the direct computation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import Granularity, compute_qparams, quantize
from lowbit.observers import (
    AbsMaxObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    ObserverError,
)

HIDDEN = 4


@st.composite
def batches(draw, hidden=HIDDEN, max_batches=5):
    """A list of (tokens, hidden) float32 batches with different token counts."""
    out = []
    for _ in range(draw(st.integers(1, max_batches))):
        rows = draw(st.integers(1, 6))
        values = draw(
            st.lists(
                st.floats(-1e4, 1e4, allow_nan=False, width=32),
                min_size=rows * hidden,
                max_size=rows * hidden,
            )
        )
        out.append(torch.tensor(values, dtype=torch.float32).reshape(rows, hidden))
    return out


def assert_same_qparams(a, b):
    assert a.granularity == b.granularity
    assert torch.equal(a.scale, b.scale)
    assert (a.zero_point is None) == (b.zero_point is None)
    if a.zero_point is not None:
        assert torch.equal(a.zero_point, b.zero_point)


@settings(max_examples=40, deadline=None)
@given(
    batches(),
    st.sampled_from(["tensor", "channel:-1", "channel:1"]),
    st.sampled_from([("int8", True), ("uint8", False), ("int4", False)]),
)
def test_minmax_streaming_equals_direct(xs, granularity, fmt_sym):
    fmt, symmetric = fmt_sym
    obs = MinMaxObserver(fmt, granularity, symmetric=symmetric)
    for x in xs:
        assert obs.update(x) is x
    direct = compute_qparams(torch.cat(xs), fmt, granularity, symmetric=symmetric)
    assert_same_qparams(obs.compute(), direct)
    lo, hi = obs.compute_range()
    cat = torch.cat(xs)
    if granularity == "tensor":
        assert lo == cat.min() and hi == cat.max()
    else:
        assert torch.equal(lo, cat.amin(0)) and torch.equal(hi, cat.amax(0))


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(["tensor", "channel:-1"]))
def test_absmax_streaming_equals_direct(xs, granularity):
    obs = AbsMaxObserver("int8", granularity)
    for x in xs:
        obs.update(x)
    assert_same_qparams(obs.compute(), compute_qparams(torch.cat(xs), "int8", granularity))
    lo, hi = obs.compute_range()
    assert torch.equal(hi, -lo)


@settings(max_examples=40, deadline=None)
@given(batches(), st.floats(0.01, 1.0))
def test_ema_follows_pytorch_formula(xs, c):
    obs = MovingAverageMinMaxObserver("uint8", "channel:-1", symmetric=False, averaging_constant=c)
    lo, hi = xs[0].amin(0), xs[0].amax(0)
    for x in xs:
        obs.update(x)
    for x in xs[1:]:
        lo = lo + c * (x.amin(0) - lo)
        hi = hi + c * (x.amax(0) - hi)
    got_lo, got_hi = obs.compute_range()
    assert torch.equal(got_lo, lo) and torch.equal(got_hi, hi)


def test_ema_constant_one_keeps_last_batch():
    obs = MovingAverageMinMaxObserver("int8", averaging_constant=1.0)
    obs.update(torch.tensor([-5.0, 5.0]))
    obs.update(torch.tensor([-1.0, 2.0]))
    lo, hi = obs.compute_range()
    assert (lo.item(), hi.item()) == (-1.0, 2.0)


def test_per_token_pools_to_one_static_range():
    torch.manual_seed(0)
    xs = [torch.randn(2, t, 8) * (t + 1) for t in (3, 5, 7)]
    tok = MinMaxObserver("int8", "token", symmetric=False)
    ten = MinMaxObserver("int8", "tensor", symmetric=False)
    for x in xs:
        tok.update(x)
        ten.update(x)
    qp = tok.compute()
    assert qp.granularity == Granularity.per_tensor() and qp.scale.shape == ()
    assert_same_qparams(qp, ten.compute())
    quantize(torch.randn(1, 11, 8), qp)  # fits any number of tokens


def test_per_channel_on_hidden_axis_for_activations():
    torch.manual_seed(0)
    obs = MinMaxObserver("int8", Granularity.per_channel(-1))
    for b, t in ((2, 3), (1, 9), (4, 1)):
        obs.update(torch.randn(b, t, 16))
    qp = obs.compute()
    assert qp.scale.shape == (16,)
    assert quantize(torch.randn(3, 5, 16), qp).shape == (3, 5, 16)
    with pytest.raises(ObserverError, match="same size"):
        obs.update(torch.randn(2, 3, 8))


def test_ragged_groups_on_weights_match_layer_one():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    obs = MinMaxObserver("uint4", "group:4", symmetric=False)
    obs.update(w)
    obs.update(w * 0.5)
    assert_same_qparams(obs.compute(), compute_qparams(w, "uint4", "group:4", symmetric=False))
    assert obs.compute().scale.shape == (6, 3)


def test_reset_forgets_everything():
    obs = AbsMaxObserver("int8", "channel:0")
    obs.update(torch.ones(3, 2) * 7)
    obs.reset()
    with pytest.raises(ObserverError, match="no data"):
        obs.compute()
    obs.update(torch.ones(5, 2))  # a new shape is fine after reset
    assert obs.compute().scale.shape == (5,)
