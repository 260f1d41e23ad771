"""Every observer: registry, bad input, per-channel shapes and per-token pooling."""

import pytest
import torch

from lowbit.formats import FormatError, Granularity, get_format, quantize
from lowbit.observers import Observer, ObserverError, get_observer, list_observers

NAMES = ["minmax", "absmax", "ema", "percentile", "meanstd", "mse", "kl"]


def test_registry_has_every_observer():
    assert sorted(NAMES) == list_observers()
    for name in NAMES:
        obs = get_observer(name, "int8", "tensor")
        assert isinstance(obs, Observer) and obs.name == name
    assert get_observer("entropy").name == "kl"
    assert get_observer("Moving-Average").name == "ema"


def test_unknown_observer_lists_valid_names():
    with pytest.raises(ObserverError, match="unknown observer 'nope'.*minmax.*kl"):
        get_observer("nope")


def test_options_are_passed_and_checked():
    assert get_observer("percentile", percentile=99.9).percentile == 99.9
    with pytest.raises(ObserverError, match="percentile"):
        get_observer("percentile", percentile=10)
    with pytest.raises(ObserverError, match="averaging_constant"):
        get_observer("ema", averaging_constant=0.0)
    with pytest.raises(ObserverError, match="bins"):
        get_observer("mse", bins=7)
    with pytest.raises(TypeError):
        get_observer("minmax", percentile=99.0)


@pytest.mark.parametrize("name", NAMES)
def test_compute_before_update_is_a_clear_error(name):
    with pytest.raises(ObserverError, match=r"no data: call update\(x\)"):
        get_observer(name).compute()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([]), "empty"),
        (torch.tensor([1.0, float("nan")]), "NaN"),
        (torch.tensor([1.0, float("inf")]), "NaN or Inf"),
        (torch.tensor([1, 2]), "floating-point"),
    ],
)
def test_bad_batches_are_rejected(name, bad, message):
    obs = get_observer(name, "int8", "channel:0")
    with pytest.raises(FormatError, match=message):
        obs.update(bad)
    assert obs.num_batches == 0


def test_format_mismatch_fails_at_construction():
    with pytest.raises(FormatError, match="unsigned"):
        get_observer("minmax", "uint8", symmetric=True)
    with pytest.raises(FormatError, match="scale dtype"):
        get_observer("mse", "int8", scale_dtype="fp64")


def batches(seed=0, hidden=12):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, t, hidden, generator=g) for b, t in ((2, 5), (1, 7), (3, 2))]
    xs[1][0, 3, 2] = 25.0  # an outlier
    return xs


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt, symmetric", [("int8", True), ("uint8", False), ("int4", True)])
def test_per_token_equals_per_tensor(name, fmt, symmetric):
    tok = get_observer(name, fmt, "token", symmetric=symmetric)
    ten = get_observer(name, fmt, "tensor", symmetric=symmetric)
    for x in batches():
        tok.update(x)
        ten.update(x)
    a, b = tok.compute(), ten.compute()
    assert a.granularity == Granularity.per_tensor() and a.scale.shape == ()
    assert torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt, symmetric", [("int8", True), ("uint4", False)])
def test_per_channel_equals_per_tensor_of_each_channel(name, fmt, symmetric):
    xs = batches(seed=1, hidden=5)
    per_channel = get_observer(name, fmt, "channel:-1", symmetric=symmetric)
    for x in xs:
        per_channel.update(x)
    qp = per_channel.compute()
    assert qp.scale.shape == (5,) and qp.granularity == Granularity.per_channel(-1)
    assert (qp.zero_point is None) == symmetric
    for c in range(5):
        single = get_observer(name, fmt, "tensor", symmetric=symmetric)
        for x in xs:
            single.update(x[..., c])
        torch.testing.assert_close(qp.scale[c], single.compute().scale, rtol=1e-6, atol=0)
    assert quantize(torch.randn(4, 5), qp).shape == (4, 5)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_fit_the_format(name):
    obs = get_observer(name, "int4", "channel:0", symmetric=False)
    obs.update(torch.randn(3, 50))
    qp = obs.compute()
    assert qp.format == get_format("int4") and qp.zero_point.dtype == torch.int8
    assert bool((qp.scale > 0).all())


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_data_gives_a_usable_scale(name):
    obs = get_observer(name, "int8")
    obs.update(torch.zeros(10))
    assert obs.compute().scale.item() == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_repr_names_the_setup(name):
    assert "int8" in repr(get_observer(name))


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_batches_are_accepted(name):
    x = torch.randn(4, 32)
    a, b = get_observer(name, "int8", "channel:0"), get_observer(name, "int8", "channel:0")
    a.update(x.half().float())
    b.update(x.half())
    assert torch.equal(a.compute().scale, b.compute().scale)
