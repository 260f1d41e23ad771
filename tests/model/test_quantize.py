"""quantize(): real size reduction, kernels chosen, quality, calibration, bad input."""

import copy

import pytest
import torch
from torch import nn

from lowbit.formats import rotate
from lowbit.kernels import assume_cpu, native
from lowbit.model import Recipe, RecipeError, Rule, Scheme, quantize
from lowbit.nn import QuantizedLinear, WeightSpec

from .tiny import tiny_llama


def _bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _linear_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, QuantizedLinear)):
            total += sum(t.numel() * t.element_size() for t in m.buffers())
            total += sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
    return total


@pytest.fixture(scope="module")
def base():
    return tiny_llama(hidden=128)


def _agreement(model, base, ids):
    with torch.inference_mode():
        ref = base(ids).logits.float()
        out = model(ids).logits.float()
    return (ref.argmax(-1) == out.argmax(-1)).float().mean().item(), \
        torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), 0).item()


@pytest.mark.parametrize("recipe,max_ratio,min_cos", [
    ("w8", 0.27, 0.999), ("w4g32", 0.19, 0.98), ("w4g128", 0.16, 0.97), ("w3g64", 0.17, 0.9),
    ("nf4g64", 0.15, 0.97), ("fp8", 0.27, 0.995), ("w8a8", 0.27, 0.995), ("w2g16", 0.16, 0.5),
])
def test_quantize_shrinks_and_keeps_quality(base, recipe, max_ratio, min_cos):
    model = copy.deepcopy(base)
    before = _linear_bytes(model)
    quantize(model, recipe, progress=False)
    after = _linear_bytes(model)
    assert after / before <= max_ratio
    assert _bytes(model) < _bytes(base)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    _, cos = _agreement(model, base, ids)
    assert cos >= min_cos
    summary = model.lowbit_summary
    assert summary.layers == 15  # 2 layers x 7 linears + lm_head
    assert sum(summary.kernels.values()) == 15


@pytest.mark.parametrize("native_bf16", [True, False])
def test_kernels_chosen(base, native_bf16):
    chosen = {}
    with assume_cpu(native_bf16=native_bf16):
        for recipe in ("w8", "w4g128", "w2g16", "w8a8"):
            model = copy.deepcopy(base)
            quantize(model, recipe, progress=False)
            chosen[recipe] = set(model.lowbit_summary.kernels)
    widen = "bf16" if native_bf16 else "fp32"  # many rows: the CPU's fast float GEMM
    # few rows: lowbit's AVX2 loop where bf16 is emulated (and it builds), else torch's kernel
    decode = ("int8_weight.native_avx2_gemv" if not native_bf16 and native.available()
              else "int8_weight.int8pack_mm")
    assert chosen["w8"] == {f"{decode} | int8_weight.widen_{widen}_linear"}
    # below 6 bits the head (the preset's int8 rule) runs the w8 kernels
    assert chosen["w2g16"] == {"dequant+F.linear"} | chosen["w8"]


def test_bf16_recipe_casts(base):
    model = copy.deepcopy(base)
    quantize(model, "bf16", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_keep_lm_head(base):
    model = copy.deepcopy(base)
    quantize(model, Recipe.parse("w8").with_keep("lm_head"), progress=False)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_static_activations_need_calibration(base):
    model = copy.deepcopy(base)
    with pytest.raises(RecipeError, match="calibration"):
        quantize(model, "w8a8-static", progress=False)
    calib = [torch.randint(0, 128, (1, 32)) for _ in range(2)]
    quantize(model, "w8a8-static", calib, progress=False)
    q = model.model.layers[0].mlp.down_proj
    assert q.input_qparams is not None and q.input_qparams.scale.numel() == 1
    ids = torch.randint(0, 128, (1, 16))
    assert _agreement(model, base, ids)[1] > 0.99


def test_pattern_matching_nothing_lists_near_matches(base):
    recipe = Recipe("x", Scheme(), rules=(Rule("model.layers.*.mlp.dwn_proj", Scheme()),))
    with pytest.raises(RecipeError, match="down_proj"):
        quantize(copy.deepcopy(base), recipe, progress=False)


def test_model_without_linears():
    with pytest.raises(RecipeError, match="no nn.Linear"):
        quantize(nn.Sequential(nn.ReLU()), "w8", progress=False)


def test_partial_groups_never_skip_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 576))
    quantize(model, "w4g128", progress=False)
    q = model[0]
    assert isinstance(q, QuantizedLinear) and q.spec.group_size == 128
    assert q.packed_weight().qparams.scale.shape == (64, 5)  # 4 full groups + 1 of 64


def test_custom_scheme_any_format():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    ref = model[0].weight.detach().clone()
    quantize(model, Recipe("t", Scheme(WeightSpec("ternary", "channel"))), progress=False)
    assert set(model[0].packed_weight().codes().unique().tolist()) <= {-1, 0, 1}
    assert model[0].dequantize_weight().shape == ref.shape


@pytest.mark.parametrize("vnni", [True, False])
def test_int4_and_w8a8_kernels_chosen(base, vnni):
    decode = "native_avx2_gemv" if native.available() else "int4pack_mm"
    int4 = f"int4_weight.{decode} | int4_weight.dequant_fp32_linear"
    w8a8 = "int8_dynamic.int_mm" if vnni else "int8_dynamic.fp32_gemm"
    if not vnni and native.available():  # decode: lowbit's AVX2 loop on the same codes
        w8a8 = f"int8_dynamic.native_avx2_gemv | {w8a8}"
    for recipe, kernel in (("w4g128", int4), ("w3g64", int4), ("w8a8", w8a8), ("w4a8", w8a8)):
        model = copy.deepcopy(base)
        with assume_cpu(native_bf16=False, vnni=vnni):
            quantize(model, recipe, progress=False)
            assert model.model.layers[0].mlp.up_proj.kernel == kernel, recipe
        kernels = set(model.lowbit_summary.kernels)
        assert model.lm_head.spec.format == "int8" and len(kernels) <= 2, recipe


def test_outlier_channels_stay_in_float(base):
    model = copy.deepcopy(base)
    calib = [torch.randint(0, 128, (1, 32)) for _ in range(2)]
    quantize(model, "w8a8-outliers", calib, progress=False)
    q = model.model.layers[0].mlp.down_proj
    assert q.outlier_index.numel() == 8 and q.outlier_weight.shape == (128, 8)
    x = torch.randn(3, q.in_features)
    assert torch.allclose(q(x), q(x, impl="reference"), atol=0.05, rtol=0.05)
    ids = torch.randint(0, 128, (1, 16))
    assert _agreement(model, base, ids)[1] > 0.99


def test_w8a8_rotates_inputs_and_matches_its_reference(base):
    """w8a8 quantizes x H per token and W H per channel (formats.rotation): the fast path
    equals the plain reference, and the effective weight is close to the float one."""
    model = copy.deepcopy(base)
    quantize(model, "w8a8", progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.spec.rotation == "hadamard"
    x = torch.randn(3, layer.in_features)
    w = base.model.layers[0].mlp.down_proj.weight.float()
    fast, ref = layer(x), layer(x, impl="reference")
    assert torch.allclose(fast.float(), ref.float(), rtol=1e-3, atol=1e-3)
    assert torch.nn.functional.cosine_similarity(
        layer.dequantize_weight().flatten(), w.flatten(), 0) > 0.9999
    plain = copy.deepcopy(base)
    quantize(plain, "w8a8-plain", progress=False)
    assert plain.model.layers[0].mlp.down_proj.spec.rotation is None


def test_rotation_skips_sizes_without_a_hadamard_and_says_so():
    model = nn.Sequential(nn.Linear(100, 24), nn.Linear(24, 8))
    with pytest.warns(UserWarning, match="no Hadamard rotation of size 100"):
        summary = quantize(model, "w8a8", progress=False).lowbit_summary
    assert summary.unrotated == ["0"]
    assert model[0].spec.rotation is None and model[1].spec.rotation == "hadamard"
    assert any("stayed unrotated" in line for line in summary.lines())


def test_rotation_refuses_algorithms_without_a_rotated_form():
    spec = WeightSpec("int8", "channel", rotation="hadamard")
    for algorithm in ("awq", "hqq", "imatrix", "kmeans"):
        with pytest.raises(RecipeError, match="rotation runs with rtn, gptq"):
            Scheme(spec, algorithm=algorithm)
    with pytest.raises(RecipeError, match="and outlier channels"):
        Scheme(spec, algorithm="gptq", outlier_channels=2)
    for algorithm in ("rtn", "smoothquant", "gptq", "awq+gptq"):
        Scheme(spec, algorithm=algorithm)


def test_static_rotation_calibrates_the_rotated_input():
    """w8a8-static-rot fixes its per-tensor input scale from the rotated activations x H
    (what the layer quantizes), not from x: an outlier channel spread by H gives a smaller
    scale, and the fast path still equals the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    calib = [torch.randn(4, 64) for _ in range(3)]
    for x in calib:
        x[:, 5] *= 40.0  # one outlier channel
    quantize(model, "w8a8-static-rot", calib, progress=False)
    layer = model[0]
    assert layer.spec.rotation == "hadamard"
    rotated_absmax = max(rotate(x, "hadamard").abs().max() for x in calib)
    plain_absmax = max(x.abs().max() for x in calib)
    scale = layer.input_qparams.scale.item()
    assert scale * 127 == pytest.approx(rotated_absmax.item(), rel=0.02)
    assert scale * 127 < 0.5 * plain_absmax.item()
    x = calib[0]
    assert torch.allclose(layer(x).float(), layer(x, impl="reference").float(),
                          rtol=1e-3, atol=1e-3)
