"""``gguf:<type>[-<algorithm>]`` recipes solve on exactly a llama.cpp block type's grid, so
the GGUF file holds the solved weights unchanged; ``-frot`` exports as a plain Llama."""

import json

import pytest
import torch

import lowbit
from lowbit.export.gguf_check import compare_weights
from lowbit.model import Recipe, RecipeError

from .conftest import dequantized_copy, logits, tiny_decoder

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = [torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(i))
         for i in range(4)]


def _export(model, tmp_path, tok):
    return lowbit.export(model, "gguf", tmp_path / "m.gguf", tokenizer=tok,
                         embedding_type="f32", float_type="f32")


@pytest.mark.parametrize("recipe, kind, exact", [
    ("gguf:q4_0-gptq", "q4_0", True), ("gguf:q8_0-gptq", "q8_0", True),
    ("gguf:q5_0", "q5_0", True), ("gguf:q4_1-gptq", "q4_1", False),
    ("gguf:q5_1-awq+gptq-frot", "q5_1", False), ("gguf:iq4_nl-gptq", "iq4_nl", True),
])
def test_solved_codes_reach_the_file_unchanged(recipe, kind, exact, tmp_path, tiny_tok):
    model = tiny_decoder("llama")
    lowbit.quantize(model, recipe, CALIB if "-" in recipe.split(":")[1] else None,
                    progress=False)
    report = _export(model, tmp_path, tiny_tok)
    assert report.carried == 15
    scales = model.model.layers[0].mlp.up_proj.packed_weight().qparams.scale
    # llama.cpp's Q4_0 / Q5_0 / IQ4_NL sign d (the largest |w| on the longer end), as lowbit
    assert bool((scales < 0).any()) == (kind in ("q4_0", "q5_0", "iq4_nl"))
    diffs = compare_weights(model, report.path)
    assert diffs[kind].tensors >= 14
    # float16 d: exact; Q4_1/Q5_1's m = -z * s is rounded to float16 once more
    assert diffs[kind].max_rel == 0 if exact else diffs[kind].max_rel <= 2.0**-11 * 1.01
    back = lowbit.load_model(report.path)
    ref = logits(dequantized_copy(model), IDS)
    assert (logits(back, IDS) - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_gguf_recipe_names_are_checked():
    recipe = Recipe.parse("gguf:q4_0-gptq")
    spec = recipe.default.weight
    assert (spec.format, spec.group_size, spec.scale_dtype) == ("int4", 32, "fp16")
    head = recipe.scheme_for("lm_head")  # llama.cpp's output type Q6_K, rounded
    assert (head.weight.format, head.weight.scale_dtype, head.algorithm) == (
        "int6", "fp16*i8", "rtn")
    assert Recipe.parse("gguf:q8_0").scheme_for("lm_head").weight.format == "int8"
    with pytest.raises(RecipeError, match="types and mixes .*q4_k_m"):
        Recipe.parse("gguf:iq4_xs")
    with pytest.raises(RecipeError, match="unknown algorithm"):
        Recipe.parse("gguf:q4_0-magic")


def test_k_quant_recipes_and_llama_cpp_fallback():
    """``gguf:q4_k``: uint4 groups of 32 on the 6-bit sub-scale grid; a layer whose rows are
    not a multiple of 256 gets llama.cpp's fallback type (Q4_K -> Q5_0, Q6_K -> Q8_0...)."""
    from lowbit.model.targets import scheme_for_width

    q4k = Recipe.parse("gguf:q4_k-gptq")
    spec = q4k.default.weight
    assert (spec.format, spec.group_size, spec.scale_dtype, spec.integer_zero_point) == (
        "uint4", 32, "fp16*u6", False)
    assert q4k.scheme_for("lm_head").weight.format == "int6"
    assert Recipe.parse("gguf:q6_k").scheme_for("lm_head").weight.scale_dtype == "fp16*i8"
    assert scheme_for_width(q4k.default, 512) is q4k.default
    for kind, fallback in [("q4_k", ("int5", True, "fp16")), ("q5_k", ("uint5", False, "fp16")),
                           ("q6_k", ("int8", True, "fp16")), ("q3_k", ("int4", True, "fp16")),
                           ("q2_k", ("int4", True, "fp16"))]:
        fitted = scheme_for_width(Recipe.parse(f"gguf:{kind}-gptq").default, 576).weight
        assert (fitted.format, fitted.symmetric, fitted.scale_dtype) == fallback
        assert fitted.group_size == 32
    assert Recipe.from_dict(json.loads(q4k.to_json())) == q4k
