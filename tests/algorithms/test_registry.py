"""The algorithm registry: one entry per algorithm, typed options that recipes hold, the
manifest records and ``lb.quantize`` / the CLI reach."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from lowbit.algorithms import GPTQ, REGISTRY, AlgorithmError, get_algorithm
from lowbit.algorithms.registry import format_options, parse_options
from lowbit.model import Recipe, RecipeError, quantize


def test_every_algorithm_has_one_entry_with_options_and_a_solver():
    assert set(REGISTRY) == {"rtn", "gptq", "gptaq", "awq", "awq+gptq", "hqq", "kmeans",
                             "imatrix", "smoothquant"}
    for name, entry in REGISTRY.items():
        assert entry.name == name and callable(entry.solve) and entry.summary
        assert dataclasses.is_dataclass(entry.resolve())
        if entry.input_scale is not None:
            assert callable(get_algorithm(entry.input_scale).search)
    assert get_algorithm("gptq").resolve() == GPTQ(act_order=True, refine_passes=2,
                                                   hessian_shrink=0.3)


def test_options_are_typed_and_checked():
    gptq = get_algorithm("gptq")
    assert gptq.check(parse_options("refine_passes=4, percdamp=0.02,act_order=false")) == (
        ("act_order", False), ("percdamp", 0.02), ("refine_passes", 4))
    assert gptq.check({"clip_ratios": "1.0/0.9"}) == (("clip_ratios", (1.0, 0.9)),)
    with pytest.raises(AlgorithmError, match="no option 'refine'.*refine_passes"):
        gptq.check({"refine": "4"})
    with pytest.raises(AlgorithmError, match="expected a value like"):
        gptq.check({"refine_passes": "many"})
    with pytest.raises(AlgorithmError, match="percdamp"):
        gptq.check({"percdamp": "-1"})  # GPTQ's own validation
    with pytest.raises(AlgorithmError, match="key=value"):
        parse_options("refine_passes")
    assert format_options((("act_order", False), ("clip_ratios", (1.0, 0.9)))) == \
        "act_order=false,clip_ratios=1.0/0.9"


def test_recipe_strings_carry_options_into_every_scheme_that_takes_them():
    recipe = Recipe.parse("w4g64-gptq-rot(refine_passes=4,percdamp=0.02)")
    assert recipe.name == "w4g64-gptq-rot(percdamp=0.02,refine_passes=4)"
    assert recipe.default.options == (("percdamp", 0.02), ("refine_passes", 4))
    assert recipe.default.weight.rotation == "hadamard"
    head = recipe.scheme_for("lm_head")  # the int8 head rule is RTN: no GPTQ options
    assert head.algorithm == "rtn" and head.options == ()
    again = Recipe.from_dict(json.loads(recipe.to_json()))
    assert again == recipe
    assert recipe.algorithm_options()["gptq(percdamp=0.02,refine_passes=4)"]["refine_passes"] == 4
    assert Recipe.parse("auto:3.5-gptq(refine_passes=1)").default.options == (
        ("refine_passes", 1),)
    with pytest.raises(RecipeError, match="has no option.*refine_passes"):
        Recipe.parse("w4g64-awq(refine_passes=1)")
    with pytest.raises(RecipeError, match="no option"):
        Recipe.parse("w4g64(percdamp=0.1)")  # round to nearest has none


def test_options_change_what_quantize_does_and_the_manifest_records_them(tmp_path):
    import lowbit as lb

    from ..model.goldens import calibration
    from ..model.tiny import tiny_llama

    def codes(recipe):
        model = tiny_llama(hidden=64)
        quantize(model, recipe, calibration(), progress=False)
        return model, model.model.layers[0].mlp.down_proj.packed_weight().codes()

    _, default = codes("w4g64-gptq")
    _, same = codes("w4g64-gptq(refine_passes=2,act_order=true)")  # the defaults, spelled out
    model, plain = codes("w4g64-gptq(refine_passes=0,act_order=false)")
    assert torch.equal(default, same) and not torch.equal(default, plain)
    info = model.lowbit_calibration["layers"]["model.layers.0.mlp.down_proj"]
    assert info["act_order"] is False and "refine_rounds" not in info
    lb.save(model, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    ran = manifest["algorithms"]["gptq(act_order=false,refine_passes=0)"]
    assert ran["refine_passes"] == 0 and ran["act_order"] is False and ran["percdamp"] == 0.01
    assert lb.load(tmp_path / "ckpt").lowbit_recipe.default.options == (
        ("act_order", False), ("refine_passes", 0))


def test_the_cli_reaches_the_options(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lowbit.cli.main", "quantize", "smollm2-135m", "-r",
         "w4g64-gptq(refine=1)", "-o", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "no option refine" in out.stderr and "refine_passes" in out.stderr
