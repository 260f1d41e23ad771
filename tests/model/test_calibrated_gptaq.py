"""GPTAQ end to end: the float path through each block beside the quantized one."""

import copy
from dataclasses import replace

import pytest
import torch

from lowbit.model import Recipe, quantize
from lowbit.model.arch import resolve_arch
from lowbit.model.pipeline import quantize_model

torch.set_num_threads(1)


def _kl(model, base):  # (mean KL of the next-token distributions on random ids)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = base(ids).logits.float().log_softmax(-1)
        out = model(ids).logits.float().log_softmax(-1)
    return (ref.exp() * (ref - out)).sum(-1).mean().item()


def _outputs(model, name, batches):
    """The outputs of layer ``name`` over ``batches``, concatenated."""
    outs = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, a, out: outs.append(out.detach().reshape(-1, out.shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat(outs)


@pytest.mark.parametrize("whole", [False, True])
def test_gptaq_layers_track_the_float_models_outputs(base, calib, whole):
    """GPTAQ's objective, per layer: the quantized layer's output on its own (drifted)
    inputs against the float model's output, ``||W X - Q X~||``. Its first group sees the
    float inputs (nothing before it is quantized), so there it is GPTQ; deeper layers
    land closer to the float outputs than GPTQ's, with residual branches or whole blocks."""
    models = {}
    for algo in ("gptq", "gptaq"):
        model = copy.deepcopy(base)
        arch = resolve_arch(model)
        if whole:
            for block in arch.blocks:
                block.branches = []
        # without the preset's int8 head rule, so the head takes the fallback below
        recipe = replace(Recipe.parse(f"w2g32-{algo}"), rules=())
        quantize_model(model, recipe, calib, progress=False, arch=arch)
        models[algo] = model
    first = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(models["gptaq"].get_submodule(first).dequantize_weight(),
                               models["gptq"].get_submodule(first).dequantize_weight(),
                               atol=1e-4, rtol=0)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        want = _outputs(base, name, calib)
        err = {a: float((_outputs(m, name, calib) - want).pow(2).mean())
               for a, m in models.items()}
        assert err["gptaq"] < 0.95 * err["gptq"], (name, err)
    layers = models["gptaq"].lowbit_calibration["layers"]
    assert layers["model.layers.1.mlp.down_proj"]["algorithm"] == "gptaq"
    # no float path past the blocks: the head gets GPTQ, and its info says so
    assert "used GPTQ" in layers["lm_head"]["fallback"]


def test_gptaq_recipes_parse_and_rotate(base, calib):
    recipe = Recipe.parse("w3g32-gptaq-rot")
    assert recipe.default.algorithm == "gptaq" and recipe.default.weight.rotation
    model = copy.deepcopy(base)
    quantize(model, recipe, calib, progress=False)
    assert _kl(model, base) < 1.0
