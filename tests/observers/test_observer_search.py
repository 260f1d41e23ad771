"""MSE clipping search: lower error than min/max on heavy tails, near-optimal on the data."""

import pytest
import torch

from lowbit.formats import (
    FormatError,
    fake_quantize,
    get_format,
    mse,
    qparams_from_range,
)
from lowbit.observers import MinMaxObserver, MSEObserver


def student_t(n=50_000, df=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=g)
    # Student-t from a normal and an independent chi-square (seeded, no global RNG)
    z = torch.randn(n, int(df), generator=g).pow(2).sum(1)
    return normal / (z / df).sqrt()


def real_error(x, obs):
    return mse(x, fake_quantize(x, obs.compute()))


@pytest.mark.parametrize("fmt, symmetric", [("int4", True), ("uint4", False), ("int3", True)])
def test_mse_beats_minmax_on_heavy_tails(fmt, symmetric):
    x = student_t()
    search, plain = MSEObserver(fmt, symmetric=symmetric), MinMaxObserver(fmt, symmetric=symmetric)
    for b in x.split(7_000):
        search.update(b)
        plain.update(b)
    assert real_error(x, search) < 0.5 * real_error(x, plain)
    assert float(search.best_ratio) < 1.0


@pytest.mark.parametrize("fmt, symmetric", [("int4", True), ("int8", True), ("uint4", False)])
def test_chosen_ratio_is_near_optimal_on_the_real_data(fmt, symmetric):
    x = student_t(seed=1)
    obs = MSEObserver(fmt, symmetric=symmetric)
    for b in x.split(10_000):
        obs.update(b)
    lo, hi = x.min(), x.max()
    real = []
    for r in obs.ratios().float():
        qp = qparams_from_range(r * lo, r * hi, fmt, symmetric=symmetric)
        real.append(mse(x, fake_quantize(x, qp)))
    assert real_error(x, obs) <= 1.02 * min(real)
    # the histogram estimate tracks the real error curve
    est = obs.errors()[0]
    rel = (est - torch.tensor(real, dtype=torch.float64)).abs() / torch.tensor(real)
    assert float(rel.max()) < 0.05


def test_mse_per_channel_and_grid_options():
    torch.manual_seed(0)
    x = torch.randn(4096, 6) * torch.tensor([0.1, 1, 10, 100, 1, 1])
    x[0, 4] = 50.0
    obs = MSEObserver("int4", "channel:1", num_candidates=20, min_ratio=0.2)
    obs.update(x)
    qp = obs.compute()
    assert qp.scale.shape == (6,)
    assert obs.errors().shape == (6, 20)
    assert obs.best_ratio[4] < obs.best_ratio[5]  # the outlier channel clips more
    assert torch.allclose(obs.ratios()[[0, -1]], torch.tensor([0.2, 1.0], dtype=torch.float64))


def test_mse_works_for_non_integer_formats():
    try:
        fmt = get_format("fp4_e2m1")
    except FormatError:
        pytest.skip("fp4_e2m1 is not registered")
    x = student_t(seed=2)
    search, plain = MSEObserver(fmt), MinMaxObserver(fmt)
    search.update(x)
    plain.update(x)
    assert real_error(x, search) < real_error(x, plain)
