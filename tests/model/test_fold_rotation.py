"""A residual-stream rotation folded into the weights leaves the model's function unchanged
and leaves a plain Llama (no online rotation) behind."""

import copy

import pytest
import torch
from torch import nn

from lowbit.model.fold_rotation import FoldError, fold_residual_rotation

from .tiny import tiny_llama


def test_the_folded_model_computes_the_same_logits():
    base = tiny_llama(hidden=64)
    with torch.no_grad():  # norms with non-trivial weights, so the fold has work to do
        for name, p in base.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    folded = copy.deepcopy(base)
    fold_residual_rotation(folded)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = base(ids).logits, folded(ids).logits
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))
    assert folded.lm_head.weight.data_ptr() != folded.model.embed_tokens.weight.data_ptr()
    assert folded.config.tie_word_embeddings is False
    assert torch.equal(folded.model.norm.weight, torch.ones(64))
    assert not torch.allclose(folded.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_folding_spreads_an_outlier_channel():
    model = tiny_llama(hidden=64)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, 5] *= 40  # one huge input channel
    before = model.model.layers[0].mlp.up_proj.weight.abs()
    fold_residual_rotation(model)
    after = model.model.layers[0].mlp.up_proj.weight.abs()
    assert after.amax() < 0.5 * before.amax()


def test_models_that_cannot_fold_are_refused():
    with pytest.raises(FoldError, match="Llama-style decoder"):
        fold_residual_rotation(nn.Sequential(nn.Linear(8, 8)))
    odd = tiny_llama(hidden=40)  # 40 = 5 * 8: no Hadamard matrix
    with pytest.raises(FoldError, match="hidden size 40"):
        fold_residual_rotation(odd)


def test_a_frot_recipe_folds_before_quantizing_and_round_trips(tmp_path):
    import lowbit as lb
    from lowbit.model import Recipe

    from .goldens import calibration

    recipe = Recipe.parse("w4g32-gptq-frot(refine_passes=0)")
    assert recipe.fold_rotation == "hadamard" and recipe.default.weight.rotation is None
    assert recipe.name == "w4g32-gptq-frot(refine_passes=0)"
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert "fold_rotation" not in Recipe.parse("w4g32").to_dict()  # old manifests unchanged
    base = tiny_llama(hidden=64)
    model = copy.deepcopy(base)
    lb.quantize(model, recipe, calibration(), progress=False)
    assert model.lowbit_folded_rotation == "hadamard"
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = base(ids).logits, model(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), 0) > 0.95
    lb.save(model, tmp_path / "ckpt")
    back = lb.load(tmp_path / "ckpt")
    assert back.lowbit_recipe.fold_rotation == "hadamard"
    with torch.no_grad():
        assert torch.allclose(back(ids).logits.float(), got, atol=1e-3)
