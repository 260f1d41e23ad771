"""Recipes: presets, grammar, patterns, round trips, bad input."""

from dataclasses import replace

import pytest

from lowbit.model import PRESETS, Recipe, RecipeError, Rule, Scheme
from lowbit.nn import WeightSpec


def test_every_issue_preset_exists():
    names = {"fp16", "bf16", "fp8", "w8", "w4g128", "w4g32", "w3g64", "w2g16", "nf4g64", "w8a8",
             "w8a8-static", "w4a8"}
    assert names <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_json_and_yaml(name, tmp_path):
    recipe = PRESETS[name]
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.load(path) == recipe
    path = tmp_path / "r.json"
    path.write_text(recipe.to_json())
    assert Recipe.parse(str(path)) == recipe


def test_grammar():
    r = Recipe.parse("w3g64-gptq")
    assert r.default.weight == WeightSpec("uint3", "group:64", False, "bf16", False)
    assert r.default.algorithm == "gptq"
    assert Recipe.parse("w8a8-static").default.activation.mode == "static"


@pytest.mark.parametrize("name, algorithm, rotation", [
    ("w4g128-izp", "rtn", None), ("w4g64-gptq-izp", "gptq", None),
    ("w4g64-gptq-rot-izp", "gptq", "hadamard"), ("w3g64-rot-izp", "rtn", "hadamard"),
    ("w4g64-gptq-izp(refine_passes=2)", "gptq", None)])
def test_izp_suffix_gives_integer_zero_points(name, algorithm, rotation):
    """``-izp``: the grouped recipe with integer zero-points (what compressed-tensors and
    GPTQ checkpoints hold); everything else stays as without it."""
    r = Recipe.parse(name)
    plain = Recipe.parse(name.replace("-izp", ""))
    assert plain.default.weight.integer_zero_point is False
    assert r.default.weight == replace(plain.default.weight, integer_zero_point=True)
    assert (r.default.algorithm, r.default.weight.rotation) == (algorithm, rotation)
    assert r.default.options == plain.default.options
    assert r.rules == plain.rules and r.name == name


@pytest.mark.parametrize("name", ["w8-izp", "w8a8-izp", "w4a8-izp"])
def test_izp_needs_a_grouped_asymmetric_recipe(name):
    with pytest.raises(RecipeError, match="grouped"):
        Recipe.parse(name)


def test_izp_weights_round_to_integer_zero_points():
    import torch

    from lowbit.model import quantize

    from .tiny import tiny_llama

    model = quantize(tiny_llama(), "w4g32-izp")
    zero = model.model.layers[0].mlp.up_proj.packed_weight().qparams.zero_point
    assert not zero.dtype.is_floating_point and int(zero.min()) >= 0 and int(zero.max()) <= 15
    assert torch.equal(zero, zero.round())


def test_rules_keep_and_first_match():
    r = Recipe("mix", Scheme(WeightSpec("int8", "channel")),
               rules=(Rule("*.mlp.*", Scheme(WeightSpec("uint4", "group:32", False))),
                      Rule("re:.*down_proj", Scheme(WeightSpec("int8", "channel")))),
               keep=("lm_head",))
    assert r.scheme_for("lm_head") is None
    assert r.scheme_for("model.layers.0.mlp.down_proj").weight.format == "uint4"
    assert r.scheme_for("model.layers.0.self_attn.q_proj").weight.format == "int8"


def test_unknown_recipe_lists_presets():
    with pytest.raises(RecipeError, match="w4g128"):
        Recipe.parse("w9")


def test_unknown_algorithm():
    with pytest.raises(RecipeError, match="gptq"):
        Scheme(algorithm="magic")


def test_newer_version_refused():
    d = PRESETS["w8"].to_dict()
    d["lowbit_recipe_version"] = 99
    with pytest.raises(RecipeError, match="upgrade"):
        Recipe.from_dict(d)


@pytest.mark.parametrize("name", ["w4g128", "w4g64", "w4g32", "w3g64", "w2g16", "nf4g64",
                                  "kmeans4", "w4g128-gptq", "w4g64-gptq-rot", "w3g64-gptaq-rot",
                                  "w4g128-awq", "w2g16-hqq", "w3g64-rot", "w5g64"])
def test_low_bit_recipes_keep_the_head_at_int8(name):
    recipe = Recipe.parse(name)
    head = recipe.scheme_for("lm_head")
    assert (head.weight.format, head.weight.to_dict()["granularity"], head.algorithm) == (
        "int8", "channel", "rtn")
    assert recipe.scheme_for("model.layers.0.mlp.up_proj") == recipe.default
    assert '"pattern": "lm_head"' in recipe.to_json()  # visible, and written to manifests
    assert recipe.with_keep("lm_head").scheme_for("lm_head") is None


@pytest.mark.parametrize("name", ["w8", "w6g64", "fp8", "w8a8", "bf16"])
def test_six_bits_and_up_quantize_the_head_like_the_rest(name):
    recipe = Recipe.parse(name)
    assert recipe.rules == () and recipe.scheme_for("lm_head") == recipe.default


def test_old_recipe_files_without_the_head_rule_still_load():
    """A recipe written before the head rule (no rules) loads as written: head at 4 bits."""
    old = {"lowbit_recipe_version": 1, "name": "w4g128", "compute_dtype": "auto",
           "default": Recipe.parse("w4g128").default.to_dict(), "rules": [], "keep": []}
    recipe = Recipe.from_dict(old)
    assert recipe.scheme_for("lm_head").weight.format == "uint4"
    assert Recipe.from_dict(Recipe.parse("w4g128").to_dict()).rules[0].optional


def test_optional_head_rule_allows_models_without_a_head():
    import torch.nn as nn

    from lowbit.model import quantize

    model = nn.Sequential(nn.Linear(64, 64))
    quantize(model, "w4g32", progress=False)
    assert model[0].spec.format == "uint4"
    with pytest.raises(RecipeError, match="matches no Linear"):
        quantize(nn.Sequential(nn.Linear(64, 64)), Recipe.parse("w8").with_keep("lm_head"),
                 progress=False)


def test_kmeans_and_codebook_formats_go_together():
    with pytest.raises(RecipeError, match="kmeans4"):
        Recipe.parse("w4g32-kmeans")
    with pytest.raises(RecipeError, match="codebook"):
        Scheme(WeightSpec("codebook4", "channel", True, "fp16"), algorithm="gptq")
    assert Recipe.parse("kmeans4").default.algorithm == "kmeans"
