"""``gguf:<type>[-<algorithm>]`` recipes solve on exactly a llama.cpp block type's grid, so
the GGUF file holds the solved weights unchanged; ``-frot`` exports as a plain Llama."""

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
    ("gguf:q5_1-awq+gptq-frot", "q5_1", False),
])
def test_solved_codes_reach_the_file_unchanged(recipe, kind, exact, tmp_path, tiny_tok):
    model = tiny_decoder("llama")
    lowbit.quantize(model, recipe, CALIB if "-" in recipe.split(":")[1] else None,
                    progress=False)
    report = _export(model, tmp_path, tiny_tok)
    assert report.carried == 15
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
    assert recipe.scheme_for("lm_head").weight.format == "int8"
    with pytest.raises(RecipeError, match="k-quants"):
        Recipe.parse("gguf:q4_k_m")
    with pytest.raises(RecipeError, match="unknown algorithm"):
        Recipe.parse("gguf:q4_0-magic")
