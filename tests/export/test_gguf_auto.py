"""``gguf:auto:<type>`` recipes: llama.cpp types chosen per layer within the bytes of
llama-quantize's ``<type>`` file, exported with the codes unchanged."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

import lowbit  # noqa: E402
from lowbit.export.gguf_check import compare_weights, read_tensors  # noqa: E402
from lowbit.model import Recipe, RecipeError  # noqa: E402
from lowbit.model.gguf_auto import fitted_type, tensor_bits  # noqa: E402
from lowbit.model.gguf_mixes import layer_types, output_type  # noqa: E402
from lowbit.model.recipe import gguf_kind, is_auto  # noqa: E402

from .test_gguf_mixes import CALIB, _decoder  # noqa: E402


def test_grammar():
    r = Recipe.parse("gguf:auto:q4_k_m-gptq")
    assert (r.name, r.rules, r.default.algorithm, gguf_kind(r)) == (
        "gguf:auto:q4_k_m-gptq", (), "gptq", "q4_k_m")
    assert is_auto(r) and not is_auto(Recipe.parse("gguf:q4_k_m-gptq"))
    assert Recipe.parse("gguf:auto:q4_0").default.algorithm == "rtn"
    shrunk = Recipe.parse("gguf:auto:q4_k_m-gptq(hessian_shrink=0.6)")
    assert dict(shrunk.default.options)["hessian_shrink"] == 0.6 and is_auto(shrunk)
    with pytest.raises(RecipeError, match="gguf:auto:<type>"):
        Recipe.parse("gguf:auto:q9_k-gptq")


def test_tensor_bits_are_gguf_bytes():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for kind in ("q8_0", "q5_0", "iq4_nl", "q6_k", "q4_k", "q2_k"):
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind.upper()]]
        assert tensor_bits(kind, (3, 512)) == 8 * 3 * (512 // block) * nbytes
    with pytest.raises(RecipeError, match="do not fill Q4_K"):
        tensor_bits("q4_k", (3, 576))
    assert [fitted_type(k, 576) for k in ("q4_k", "q5_k", "q6_k", "q3_k", "q5_0")] == [
        "q5_0", "q5_1", "q8_0", "q4_0", "q5_0"]


def _bits(shapes: dict[str, tuple], types: dict[str, str]) -> int:
    return sum(tensor_bits(fitted_type(t, shapes[n][1]), shapes[n]) for n, t in types.items())


@pytest.mark.parametrize("tied", [True, False])
def test_resolves_within_the_mix_bytes_and_exports_exactly(tied, tmp_path, tiny_tok):
    model = _decoder(tied)
    mix = {**layer_types(model, "q4_k_m"), "lm_head": output_type("q4_k_m")}
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in mix}
    budget = _bits(shapes, mix)
    lowbit.quantize(model, "gguf:auto:q4_k_m-gptq", CALIB, progress=False)
    recipe = model.lowbit_recipe
    assert recipe.name == "gguf:auto:q4_k_m-gptq" and not is_auto(recipe)
    chosen = {n: _type_of(recipe, n) for n in mix}
    assert _bits(shapes, chosen) <= budget
    assert chosen != mix  # the measured choice is not llama.cpp's rule of thumb
    # the choice is the best the sensitivity model predicts: at least as good as the mix's
    sens = model.lowbit_sensitivity
    predicted = {n: sens[n]["kl"] for n in mix}
    assert sum(predicted[n][chosen[n]] for n in mix) <= sum(predicted[n][mix[n]] for n in mix)
    assert recipe.scheme_for("lm_head").algorithm == "rtn"
    assert recipe.scheme_for("model.layers.0.mlp.up_proj").algorithm == "gptq"
    ckpt = lowbit.save(model, tmp_path / "ckpt", tokenizer=tiny_tok)
    assert lowbit.load(ckpt).lowbit_recipe == recipe
    ours = lowbit.export(ckpt, "gguf", tmp_path / "auto.gguf", tokenizer=tiny_tok)
    assert ours.carried == len(mix) and ours.shared_head == tied
    types = {n: t for n, (t, _) in read_tensors(ours.path).items()}
    if tied:  # every tensor carries lowbit's codes
        assert all(d.max_rel <= 2.0**-11 for d in compare_weights(lowbit.load(ckpt),
                                                                  ours.path).values())
    else:  # the embedding gets what llama-quantize gives it in a Q4_K_M file
        assert types["token_embd.weight"] == "q4_k"
    assert types["blk.0.ffn_up.weight"] == chosen["model.layers.0.mlp.up_proj"]
    plain = _decoder(tied)
    lowbit.quantize(plain, "gguf:q4_k_m-gptq", CALIB, progress=False)
    theirs = lowbit.export(plain, "gguf", tmp_path / "mix.gguf", tokenizer=tiny_tok)
    assert ours.file_bytes <= theirs.file_bytes


def _type_of(recipe, name: str) -> str:
    from lowbit.model.gguf_grids import grid_of

    return grid_of(recipe.scheme_for(name).weight)


def test_rows_a_k_quant_cannot_hold_choose_among_the_fallbacks():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=192, intermediate_size=512,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lowbit.quantize(model, "gguf:auto:q4_k_m", CALIB, progress=False)
    recipe = model.lowbit_recipe
    for name, module in model.named_modules():
        if hasattr(module, "in_features"):
            kind = _type_of(recipe, name)
            if module.in_features == 192:
                assert kind in ("q4_0", "iq4_nl", "q5_0", "q5_1", "q8_0"), (name, kind)
            assert name in model.lowbit_sensitivity


def test_needs_calibration():
    with pytest.raises(RecipeError, match="calibration"):
        lowbit.quantize(_decoder(True), "gguf:auto:q4_k_m-gptq", progress=False)


def test_cli_quantize_then_export(tmp_path, tiny_llama_dir, capsys):
    from lowbit.cli.main import main

    out = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_llama_dir), "-r", "gguf:auto:q4_0-gptq", "-o", str(out),
                 "--calibration-tokens", "1024", "--quiet"]) == 0
    recipe = lowbit.load(out).lowbit_recipe
    assert recipe.name == "gguf:auto:q4_0-gptq" and recipe.rules
    assert main(["export", str(out), "--to", "gguf", "-o", str(tmp_path / "m.gguf"),
                 "--check"]) == 0
    assert "carry lowbit's codes unchanged" in capsys.readouterr().out
    assert main(["quantize", str(tiny_llama_dir), "-r", "gguf:auto:q4_0-gptq", "-o",
                 str(tmp_path / "x"), "--ray"]) == 2
    assert "gguf:auto" in capsys.readouterr().err
