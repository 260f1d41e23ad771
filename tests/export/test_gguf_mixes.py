"""``gguf:<mix>`` recipes give every tensor the type llama-quantize gives it (checked against
the real llama-quantize where it is built), and the export is laid out as llama-quantize's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

import lowbit  # noqa: E402
from lowbit.export import llama_cpp_tools as tools  # noqa: E402
from lowbit.export.gguf_check import compare_weights, read_tensors  # noqa: E402
from lowbit.model import Recipe  # noqa: E402
from lowbit.model.gguf_mixes import more_bits, tensor_type  # noqa: E402

CALIB = [torch.randint(0, 300, (1, 128), generator=torch.Generator().manual_seed(i))
         for i in range(6)]


def test_llama_cpp_layer_choice_for_30_layers():
    """SmolLM2's 30 layers: Q4_K_M's Q6_K layers are the first 3, the last 4 and every third
    between (llama.cpp's use_more_bits); Q3_K_M's attn_v is Q5_K in the first 2 layers."""
    picked = [i for i in range(30) if more_bits(i, 30)]
    assert picked == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [tensor_type("q4_k_m", "ffn_down", i, 30) for i in (4, 5)] == ["q4_k", "q6_k"]
    assert [tensor_type("q3_k_m", "attn_v", i, 30) for i in (1, 2)] == ["q5_k", "q4_k"]
    assert tensor_type("q3_k_m", "ffn_down", 1, 30) == "q4_k"  # 1 < 30 // 16 is false
    assert tensor_type("q2_k", "attn_v", 0, 30, gqa=3) == "q3_k"
    assert tensor_type("q2_k", "attn_v", 0, 30, gqa=4) == "q4_k"
    assert tensor_type("q4_k_m", None, 0, 30) == "q4_k"
    # IQ4_NL (no importance matrix): ffn_down Q5_K in the first 30 // 8 = 3 layers
    assert [tensor_type("iq4_nl", "ffn_down", i, 30) for i in (2, 3)] == ["q5_k", "iq4_nl"]
    assert [tensor_type("iq4_nl", "attn_v", 0, 30, gqa=g) for g in (3, 4)] == ["iq4_nl", "q5_k"]


def _decoder(tied: bool, layers: int = 8):
    """A random Llama whose rows fill k-quant super-blocks (256, 512), 4 query heads per k/v
    head (Q2_K's attn_v rule), 8 layers (the mixes' first/last eighth)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
        tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.lowbit_spec = "<tiny llama>"
    return model


def _types(path) -> dict[str, str]:
    return {name: kind for name, (kind, _) in read_tensors(path).items()
            if not name.endswith("norm.weight")}


def test_mix_recipe_resolves_per_layer_and_reloads(tmp_path, tiny_tok):
    model = _decoder(tied=True)
    lowbit.quantize(model, "gguf:q4_k_m-gptq", CALIB, progress=False)
    recipe = model.lowbit_recipe
    assert recipe.name == "gguf:q4_k_m-gptq"
    assert recipe.scheme_for("model.layers.0.self_attn.v_proj").weight.format == "int6"
    assert recipe.scheme_for("model.layers.1.self_attn.v_proj").weight.format == "uint4"
    assert recipe.scheme_for("model.layers.0.self_attn.v_proj").algorithm == "gptq"
    assert recipe.scheme_for("lm_head").algorithm == "rtn"
    # the tied embedding is the quantized head, so the export equals lowbit's model
    head = model.lm_head.dequantize_weight(torch.float32)
    assert torch.equal(model.get_input_embeddings().weight.float(), head.to(
        model.get_input_embeddings().weight.dtype).float())
    ckpt = lowbit.save(model, tmp_path / "ckpt", tokenizer=tiny_tok)
    assert lowbit.load(ckpt).lowbit_recipe == recipe
    report = lowbit.export(ckpt, "gguf", tmp_path / "m.gguf", tokenizer=tiny_tok)
    assert report.shared_head and report.carried == 8 * 7 + 1
    diffs = compare_weights(lowbit.load(ckpt), report.path)
    assert diffs["q6_k"].tensors == 2 * 4 + 1  # attn_v, ffn_down of layers 0, 3, 6, 7; the head
    assert all(d.max_rel <= 2.0**-11 for d in diffs.values())
    assert Recipe.parse("gguf:q4_k_m").rules == Recipe.parse("gguf:q4_k").rules


needs_quantize = pytest.mark.skipif(
    tools.find_tool("llama-quantize") is None,
    reason=f"llama-quantize not found in {tools.tool_dir()}; {tools.BUILD_HINT}")


@needs_quantize
@pytest.mark.parametrize("kind, tied", [
    ("q4_k_m", True), ("q4_k_m", False), ("q3_k_m", True), ("q2_k", True), ("q4_k_s", False),
    ("q5_k_m", True), ("q3_k_l", True), ("q4_0", True), ("q8_0", False), ("q6_k", True),
    ("iq4_nl", True), ("iq4_nl", False),
])
def test_each_tensor_gets_llama_quantize_type(kind, tied, tmp_path, tiny_tok):
    model = _decoder(tied)
    f32 = lowbit.export(model, "gguf", tmp_path / "f32.gguf", tokenizer=tiny_tok,
                        float_type="f32", embedding_type="f32").path
    theirs = _types(tools.quantize(f32, tmp_path / "theirs.gguf", kind))
    lowbit.quantize(model, f"gguf:{kind}", progress=False)
    ours = _types(lowbit.export(model, "gguf", tmp_path / "ours.gguf", tokenizer=tiny_tok).path)
    assert ours == theirs
