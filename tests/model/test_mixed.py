"""Automatic mixed precision: parsing, allocation under a budget, explicit recipes, errors."""

import copy

import pytest
import torch

from lowbit.model import Recipe, RecipeError, quantize
from lowbit.model.mixed import (
    _hull,
    allocate,
    candidate_schemes,
    layer_bits,
    recipe_from_choice,
    sensitivity,
    solved_errors,
)
from lowbit.model.recipe import auto_placeholder, is_auto

from .tiny import tiny_llama

torch.set_num_threads(1)


def test_auto_grammar():
    assert Recipe.parse("auto:3.5").name == "auto:3.5" and is_auto(Recipe.parse("auto:3.5"))
    assert Recipe.parse("auto:3.5bpw").name == "auto:3.5"
    r = Recipe.parse("auto:4-gptq")
    assert r.name == "auto:4-gptq" and r.default.algorithm == "gptq"
    assert Recipe.parse("auto:3.5-awq+gptq").default.algorithm == "awq+gptq"
    for key, algorithm in (("auto:3.5-gptq-rot", "gptq"), ("auto:3.5-rot", "rtn"),
                           ("auto:3.5-awq+gptq-rot", "awq+gptq")):
        r = Recipe.parse(key)
        assert (r.name, r.default.algorithm, r.default.weight.rotation) == (
            key, algorithm, "hadamard")
    assert Recipe.parse("auto:3.5-gptq").default.weight.rotation is None
    with pytest.raises(RecipeError, match="unknown algorithm 'bogus'"):
        Recipe.parse("auto:3.5-bogus")
    with pytest.raises(RecipeError, match="auto:<bits per weight>"):
        auto_placeholder("auto:lots")


def _sens(layers):
    """layers: name -> (numel, {cand: (bits per weight, kl)})."""
    return {n: {"numel": numel, "bits": {c: b * numel for c, (b, _) in opts.items()},
                "kl": {c: k for c, (_, k) in opts.items()}} for n, (numel, opts) in layers.items()}


def test_allocation_spends_bits_where_kl_drops_most():
    opts_sensitive = {"w3": (3.4, 1.0), "w4": (4.2, 0.1), "w8": (8.1, 0.0)}
    opts_robust = {"w3": (3.4, 0.05), "w4": (4.2, 0.02), "w8": (8.1, 0.0)}
    sens = _sens({"a": (100, opts_sensitive), "b": (100, opts_robust)})
    choice = allocate(sens, 3.8)  # room for one upgrade to 4 bits
    assert choice == {"a": "w4", "b": "w3"}
    assert allocate(sens, 3.4) == {"a": "w3", "b": "w3"}
    assert allocate(sens, 9) == {"a": "w8", "b": "w8"}


def test_allocation_respects_the_budget_and_refuses_too_little():
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i in range(20):
        k = float(torch.rand(1, generator=g)) + 0.1
        numel = int(torch.randint(50, 500, (1,), generator=g))
        layers[f"l{i}"] = (numel, {"w2": (2.4, 8 * k), "w3": (3.4, k), "w4": (4.2, k / 8)})
    sens = _sens(layers)
    total = sum(v[0] for v in layers.values())
    for bpw in (2.4, 3.0, 3.5, 4.0):
        choice = allocate(sens, bpw)
        used = sum(sens[n]["bits"][c] for n, c in choice.items())
        assert used <= bpw * total + 1e-6
    with pytest.raises(RecipeError, match="below the smallest candidate format.*2.400"):
        allocate(sens, 2.0)


def test_allocation_does_not_strand_a_big_layers_step():
    """Small layers gain more per bit, so the greedy walk upgrades them first and the head's
    big step no longer fits; upgrading the head and leaving the small ones saves more KL."""
    small = {"kl": {"lo": 0.5, "hi": 0.4}, "bits": {"lo": 40, "hi": 60}, "numel": 10}
    sens = {"a": copy.deepcopy(small), "b": copy.deepcopy(small),
            "head": {"kl": {"lo": 1.0, "hi": 0.0}, "bits": {"lo": 400, "hi": 800},
                     "numel": 100}}
    assert allocate(sens, 880 / 120) == {"a": "lo", "b": "lo", "head": "hi"}
    assert allocate(sens, 879 / 120) == {"a": "hi", "b": "hi", "head": "lo"}


def test_hull_drops_dominated_points():
    pts = [(2, 9.0, "a"), (3, 4.0, "b"), (4, 3.9, "c"), (5, 0.5, "d"), (6, 0.6, "e")]
    assert [p[2] for p in _hull(pts)] == ["a", "b", "d"]


def test_explicit_recipe_round_trips_json():
    schemes = candidate_schemes(("w3g64", "w4g128"), "gptq")
    choice = {"model.layers.0.mlp.up_proj": "w4g128", "model.layers.0.mlp.down_proj": "w3g64",
              "model.layers.1.mlp.up_proj": "w3g64"}
    recipe = recipe_from_choice(choice, schemes, "mixed-3.5bpw", keep=("lm_head",))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.scheme_for("model.layers.0.mlp.up_proj").weight.group_size == 128
    assert recipe.scheme_for("model.layers.1.mlp.up_proj").algorithm == "gptq"
    assert recipe.scheme_for("lm_head") is None




def test_sensitivity_anchor_matches_measurement_at_the_anchor(base, calib):
    model = copy.deepcopy(base)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    cands = candidate_schemes(("w3g64", "w8"))
    full = sensitivity(model, calib[:1], cands, names, anchor="w3g64", measure="all",
                       progress=False)
    fast = sensitivity(model, calib[:1], cands, names, anchor="w3g64", progress=False)
    for n in names:
        assert fast[n]["kl"]["w3g64"] == pytest.approx(full[n]["kl"]["w3g64"])
        assert full[n]["kl"]["w8"] < full[n]["kl"]["w3g64"]
        assert fast[n]["kl"]["w8"] < fast[n]["kl"]["w3g64"]
    with torch.no_grad():  # the model is left as it was
        assert torch.equal(model(calib[0]).logits, base(calib[0]).logits)


def test_solved_errors_score_what_gptq_leaves(base, calib):
    """For GPTQ the candidates are scored after solving: their Hessian-weighted output error
    ``tr(dW H dW^T)`` (``H = 2/n X^T X`` of the float model's inputs) is below round to
    nearest's on the same ``H``, and sensitivity measures the anchor's KL with GPTQ's weight."""
    model = copy.deepcopy(base)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.1.self_attn.k_proj"]
    cands = candidate_schemes(("w2g64", "w3g64", "w8"), "gptq")
    solved = solved_errors(model, calib, cands, names, keep={"w3g64"}, progress=False)
    xs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n in names]
    with torch.no_grad():
        for b in calib:
            model(b)
    for h in hooks:
        h.remove()
    rtn = candidate_schemes(cands)
    for n in names:
        X = torch.cat(xs[n]).double()
        H = (2 * X.T @ X / len(X)).float()
        W = model.get_submodule(n).weight.detach().float()
        err = solved[n]["err"]
        assert set(solved[n]["w_hat"]) == {"w3g64"}
        dW = W - solved[n]["w_hat"]["w3g64"]
        assert err["w3g64"] == pytest.approx(float(((dW @ H) * dW).sum()), rel=1e-3)
        for c in ("w2g64", "w3g64"):
            dW = W - layer_bits(W, rtn[c])[1]
            assert err[c] < 0.9 * float(((dW @ H) * dW).sum())
        assert err["w2g64"] > err["w3g64"] > err["w8"]
    sens = sensitivity(model, calib[:1], rtn, names, anchor="w3g64", progress=False,
                       solved=solved)
    plain = sensitivity(model, calib[:1], rtn, names, anchor="w3g64", progress=False)
    for n in names:
        assert sens[n]["err"] == solved[n]["err"]
        assert sens[n]["kl"]["w3g64"] != plain[n]["kl"]["w3g64"]


def test_auto_recipe_end_to_end(base, calib):
    model = copy.deepcopy(base)
    quantize(model, Recipe.parse("auto:4").with_keep("lm_head"), calib, progress=False)
    recipe = model.lowbit_recipe
    assert recipe.name == "mixed-4bpw" and recipe.keep == ("lm_head",)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    sens = model.lowbit_sensitivity
    bits = sum(sens[n]["bits"][c] for n, c in _choice(recipe, sens).items())
    assert bits <= 4 * sum(e["numel"] for e in sens.values())


def _choice(recipe, sens):
    names = {}
    for n in sens:
        scheme = recipe.scheme_for(n)
        names[n] = next(c for c, s in candidate_schemes(
            sens[n]["bits"], rotation=scheme.weight.rotation).items() if s.weight == scheme.weight)
    return names


def test_auto_errors(base, calib):
    with pytest.raises(RecipeError, match="below the smallest candidate format"):
        quantize(copy.deepcopy(base), "auto:1.5", calib, progress=False)
    with pytest.raises(RecipeError, match="calibration data"):
        quantize(copy.deepcopy(base), "auto:3.5", progress=False)


def test_auto_recipe_in_the_rotated_basis(calib):
    """``auto:<bpw>-gptq-rot``: sensitivity measures each candidate's RTN in the rotated
    basis (rotated back to the weight the layer applies), every chosen scheme rotates, and
    the bits stay within the budget; a width without a Hadamard matrix is measured and
    quantized unrotated."""
    base = tiny_llama(hidden=48)  # 48 = 12 * 4 and 128: both have Hadamard matrices
    model = copy.deepcopy(base)
    quantize(model, Recipe.parse("auto:4-gptq-rot").with_keep("lm_head"), calib, progress=False)
    recipe = model.lowbit_recipe
    assert recipe.name == "mixed-4bpw-gptq-rot"
    sens = model.lowbit_sensitivity
    for name in sens:
        assert recipe.scheme_for(name).weight.rotation == "hadamard"
        assert model.get_submodule(name).spec.rotation == "hadamard"
    bits = sum(sens[n]["bits"][c] for n, c in _choice(recipe, sens).items())
    assert bits <= 4 * sum(e["numel"] for e in sens.values())
    with torch.no_grad():
        ref = base(calib[0]).logits.log_softmax(-1)
        out = model(calib[0]).logits.log_softmax(-1)
    assert float((ref.exp() * (ref - out)).sum(-1).mean()) < 0.01
    odd = copy.deepcopy(tiny_llama(hidden=64))  # intermediate 160: no Hadamard matrix
    with pytest.warns(UserWarning, match="no Hadamard rotation of size 160"):
        quantize(odd, Recipe.parse("auto:4-rot").with_keep("lm_head"), calib, progress=False)
    assert odd.model.layers[0].mlp.down_proj.spec.rotation is None
    assert odd.model.layers[0].mlp.up_proj.spec.rotation == "hadamard"
