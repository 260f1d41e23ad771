"""prepare_qat / convert: fake-quant forward equals the packed model, PTQ parity, errors."""

import copy

import pytest
import torch
from torch import nn

from lowbit.model import Recipe, RecipeError, Scheme, load, quantize, save
from lowbit.nn import QuantizedLinear, WeightSpec
from lowbit.nn.conv import QuantizedConv2d
from lowbit.nn.fake_quant import FakeQuantConv2d, FakeQuantError, FakeQuantLinear
from lowbit.training.qat import QATConfig, convert, prepare_qat, trainable_parameters
from tests.model.tiny import tiny_llama


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10))


def _train_a_little(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _recipe(fmt, gran="channel", symmetric=True, scale_dtype="fp32"):
    return Recipe("t", Scheme(WeightSpec(fmt, gran, symmetric, scale_dtype)),
                  compute_dtype="fp32")


CASES = [("int8", "channel", True, "fp32", "minmax"), ("int4", "channel", True, "fp32", "lsq"),
         ("uint4", "group:16", False, "bf16", "lsq"), ("uint3", "group:8", False, "fp32", "lsq+"),
         ("ternary", "channel", True, "fp32", "lsq"), ("binary", "channel", True, "fp32", "lsq"),
         ("nf4", "group:16", True, "fp32", "minmax")]


@pytest.mark.parametrize("fmt,gran,sym,sdt,scales", CASES, ids=[c[0] for c in CASES])
def test_convert_equals_fake_quant_forward(fmt, gran, sym, sdt, scales):
    model = prepare_qat(small_cnn(), _recipe(fmt, gran, sym, sdt), scales=scales)
    _train_a_little(model)
    model.eval()
    x = torch.randn(4, 1, 6, 6)
    fakes = {n: copy.deepcopy(m) for n, m in model.named_modules()
             if isinstance(m, (FakeQuantLinear, FakeQuantConv2d))}
    with torch.no_grad():
        expected = model(x)
    convert(model)
    assert isinstance(model[0], QuantizedConv2d) and isinstance(model[3], QuantizedLinear)
    layer_in = {"0": x, "3": torch.randn(4, 144), "5": torch.randn(4, 32)}
    with torch.no_grad():
        for name, fake in fakes.items():  # same codes: layer by layer within 1e-5
            q = model.get_submodule(name)
            got = q(layer_in[name], impl="reference")
            assert torch.allclose(got, fake(layer_in[name]), atol=1e-5), name
        # the whole model on its fast kernels (the int8 one runs bf16 activations)
        assert torch.allclose(model(x), expected, atol=3e-3)


def test_ptq_through_qat_equals_quantize():
    """convert(prepare_qat(m, r)) without training is round-to-nearest PTQ."""
    base = tiny_llama()
    a = convert(prepare_qat(copy.deepcopy(base), "w4g32"))
    b = quantize(copy.deepcopy(base), "w4g32", progress=False)
    qa, qb = a.model.layers[0].mlp.down_proj, b.model.layers[0].mlp.down_proj
    assert qa.kernel == qb.kernel
    assert torch.equal(qa.packed_weight().codes(), qb.packed_weight().codes())
    assert torch.equal(qa.packed_weight().qparams.scale, qb.packed_weight().qparams.scale)


def test_llama_qat_convert_save_load(tmp_path):
    base = tiny_llama()
    model = prepare_qat(copy.deepcopy(base), "w4g32", scales="lsq")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, 128, (2, 16))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    convert(model)
    assert all(type(m) is not nn.Linear for m in model.modules())
    out = save(model, tmp_path / "q")
    again = load(out)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_static_activations_observe_then_freeze_and_convert():
    base = tiny_llama()
    model = prepare_qat(copy.deepcopy(base), "w8a8-static", freeze_after=2)
    for _ in range(3):
        model(torch.randint(0, 128, (1, 8)))
    fq = model.model.layers[0].mlp.down_proj
    assert fq.input_quantizer.frozen and int(fq.input_quantizer.step) == 2
    convert(model)
    q = model.model.layers[0].mlp.down_proj
    assert q.input_qparams is not None and q.kernel.startswith("int8")


def test_train_scales_and_lora_select_parameters():
    model = prepare_qat(small_cnn(), "w4g32", scales="lsq", train="scales", convs=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("weight_quantizer.scale") for n in names)
    model = prepare_qat(small_cnn(), "w4g32", scales="lsq", train="lora", lora_rank=2)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_a" in n for n in names) and not any(n.endswith(".weight") for n in names)
    _train_a_little(model)
    convert(model)  # the merged adapters are packed


@pytest.mark.parametrize("recipe,kwargs,match", [
    ("fp16", {}, "cast-only"),
    ("w4g128-gptq", {}, "QAT learns its own rounding"),
    ("w8a8", {"scales": "lsq+"}, "symmetric weights"),
    ("w4g32", {"train": "scales"}, "scales='lsq'"),
])
def test_bad_requests_are_clear_errors(recipe, kwargs, match):
    with pytest.raises(RecipeError, match=match):
        prepare_qat(small_cnn(), recipe, **kwargs)


def test_format_without_gradient_path_fails_at_prepare():
    recipe = _recipe("mxfp4", "group:32", True, "e8m0")
    with pytest.raises(FakeQuantError, match="no gradient path"):
        prepare_qat(small_cnn(), recipe, scales="lsq")
    with pytest.raises(FakeQuantError, match="no zero-point"):
        prepare_qat(small_cnn(), _recipe("nf4", "group:16"), scales="lsq+")


def test_prepare_twice_and_convert_without_prepare():
    model = prepare_qat(small_cnn(), "w8")
    with pytest.raises(RecipeError, match="already"):
        prepare_qat(model, "w8")
    with pytest.raises(RecipeError, match="prepare_qat first"):
        convert(small_cnn())


def test_config_round_trips():
    cfg = QATConfig(scales="lsq+", train="lora", lora_rank=4)
    assert QATConfig.from_dict(cfg.to_dict()) == cfg
