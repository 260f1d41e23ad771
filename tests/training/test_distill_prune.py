"""Distillation loss and magnitude pruning (unstructured, 2:4) composed with QAT."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.model import Recipe, Scheme
from lowbit.nn import WeightSpec
from lowbit.training import (
    TrainingError,
    distillation_loss,
    kd_loss,
    magnitude_mask,
    prune,
    semi_structured_mask,
    sparse_nbytes,
    train,
)
from lowbit.training.qat import convert, prepare_qat


def test_distillation_loss_is_t2_kl():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    assert distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    for temp in (1.0, 2.0):
        p_t = F.softmax(t / temp, -1)
        ref = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
        assert distillation_loss(s, t, temp).item() == pytest.approx(ref.item(), rel=1e-5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 0] = True
    kl00 = distillation_loss(s[0, 0], t[0, 0])
    assert distillation_loss(s, t, mask=mask).item() == pytest.approx(kl00.item(), rel=1e-5)
    labels = torch.randint(0, 7, (3, 5))
    mixed = kd_loss(s, t, labels, alpha=0.5)
    ce = F.cross_entropy(s.reshape(-1, 7), labels.reshape(-1))
    assert mixed.item() == pytest.approx(0.5 * distillation_loss(s, t).item() + 0.5 * ce.item(),
                                         rel=1e-5)
    with pytest.raises(TrainingError, match="shape"):
        distillation_loss(s, t[:, :4])


def test_unstructured_mask_keeps_largest():
    w = torch.tensor([[0.1, -3.0, 0.2, 4.0], [-0.05, 1.0, -2.0, 0.3]])
    mask = magnitude_mask(w, 0.5)
    assert mask.sum() == 4
    assert set(w[mask].abs().tolist()) == {3.0, 4.0, 1.0, 2.0}


def test_two_four_pattern():
    torch.manual_seed(0)
    w = torch.randn(8, 3, 4, 4)  # a conv weight: 48 inputs per output channel
    mask = semi_structured_mask(w)
    groups = mask.reshape(-1, 4)
    assert torch.equal(groups.sum(1), torch.full((groups.shape[0],), 2))
    a = w.abs().reshape(-1, 4)
    kept = torch.where(groups, a, torch.inf).amin(1)
    dropped = torch.where(groups, 0.0, a).amax(1)
    assert (kept >= dropped).all()  # the two largest magnitudes of every group survive
    with pytest.raises(TrainingError, match="multiple of 4"):
        semi_structured_mask(torch.randn(2, 6))
    assert sparse_nbytes(mask, 4, "2:4") == mask.sum().item() * (4 + 2) / 8


def test_prune_quantize_finetune_keeps_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    masks = prune(model, pattern="2:4")
    assert masks.sparsity() == pytest.approx(0.5)
    recipe = Recipe("t", Scheme(WeightSpec("int4", "channel")), compute_dtype="fp32")
    prepare_qat(model, recipe, scales="lsq")
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 16, generator=gen), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(4)]
    train(model, data, lambda m, b: F.cross_entropy(m(b[0]), b[1]), steps=5, lr=1e-2,
          masks=masks, progress=False)
    for name, mask in masks.masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()
    convert(model)
    for name, mask in masks.masks.items():  # zero stays exactly zero after packing
        codes = model.get_submodule(name).packed_weight().codes()
        assert (codes[~mask] == 0).all()


def test_prune_unstructured_sparsity_and_errors():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    masks = prune(copy.deepcopy(model), 0.75)
    assert masks.sparsity() == pytest.approx(0.75, abs=0.02)
    with pytest.raises(TrainingError, match="sparsity"):
        prune(model, 1.5)
    with pytest.raises(TrainingError, match="pattern"):
        prune(model, pattern="3:8?")
