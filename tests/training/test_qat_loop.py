"""The training loop: resume equals an uninterrupted run, NaN stops, recipe mismatch."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.model import Recipe, Scheme
from lowbit.nn import WeightSpec
from lowbit.training import TrainingError, train
from lowbit.training.qat import prepare_qat
from lowbit.training.qat_loop import STATE


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    recipe = Recipe("int4-ch", Scheme(WeightSpec("int4", "channel")), compute_dtype="fp32")
    prepare_qat(model, recipe, scales="lsq")
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(5)]
    return model, data, {"recipe": recipe.to_dict()}


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_matches_uninterrupted_run(tmp_path, schedule):
    model, data, meta = _setup()
    full = train(model, data, _ce, steps=6, lr=1e-2, progress=False, schedule=schedule)
    model, data, meta = _setup()
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):  # interrupted after step 4's checkpoint
        train(model, data, _interrupt_after(4), steps=6, lr=1e-2, checkpoint_dir=ckpt,
              checkpoint_every=2, meta=meta, progress=False, schedule=schedule)
    model, data, meta = _setup(seed=5)  # a fresh model: everything comes from the checkpoint
    resumed = train(model, data, _ce, steps=6, lr=1e-2, checkpoint_dir=ckpt, resume=True,
                    meta=meta, progress=False, schedule=schedule)
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    assert json.loads((ckpt / STATE).read_text())["step"] == 6


def _interrupt_after(n):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return _ce(model, batch)

    return loss_fn


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model, data, meta = _setup()
    ckpt = tmp_path / "ckpt"

    def loss_fn(m, batch):
        loss = _ce(m, batch)
        return loss * float("nan") if calls.append(1) or len(calls) == 5 else loss

    calls = []
    with pytest.raises(TrainingError, match=r"nan at step 5.*last good checkpoint \(step 4\)"):
        train(model, data, loss_fn, steps=10, lr=1e-2, checkpoint_dir=ckpt,
              checkpoint_every=2, meta=meta, progress=False)
    state = json.loads((ckpt / STATE).read_text())
    assert state["step"] == 4 and len(state["losses"]) == 4
    assert not list(tmp_path.glob(".ckpt*"))  # nothing half-written left behind
    model, data, meta = _setup()
    train(model, data, _ce, steps=6, lr=1e-3, checkpoint_dir=ckpt, resume=True, meta=meta,
          progress=False)  # the kept checkpoint resumes


def test_resume_with_a_different_recipe_is_an_error(tmp_path):
    model, data, meta = _setup()
    ckpt = tmp_path / "ckpt"
    train(model, data, _ce, steps=2, lr=1e-2, checkpoint_dir=ckpt, meta=meta, progress=False)
    other = {"recipe": Recipe.parse("w4g32").to_dict()}
    with pytest.raises(TrainingError, match="different run.*recipe.*'int4-ch'.*'w4g32'"):
        train(model, data, _ce, steps=4, checkpoint_dir=ckpt, resume=True, meta=other,
              progress=False)
    with pytest.raises(TrainingError, match="no training checkpoint"):
        train(model, data, _ce, steps=4, checkpoint_dir=tmp_path / "nothing", resume=True,
              progress=False)


def test_non_finite_gradient_stops_before_the_step():
    model, data, meta = _setup()
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(m, batch):  # finite loss, NaN gradient (sqrt at 0)
        return _ce(m, batch) + (m[0].weight * 0).sum().sqrt()

    with pytest.raises(TrainingError, match="gradient norm is nan at step 1"):
        train(model, data, loss_fn, steps=2, lr=1e-2, meta=meta, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
