"""Checkpoints saved before the model layer was rearranged still load, bit for bit.

``fixtures/v1_*`` were written by ``lb.save`` of the tiny Llama (``tiny.py``) quantized with
the recipes below (checkpoint format version 1), with the logits of tokens 0..15 beside them.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .goldens import digest

FIXTURES = Path(__file__).with_name("fixtures")
RECIPES = ["w4g64-gptq", "w8a8-static", "kmeans4", "auto:3.5"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_version_1_checkpoint_loads_with_its_bits_and_logits(recipe):
    import lowbit as lb

    folder = FIXTURES / f"v1_{recipe.replace(':', '_')}"
    model = lb.load(folder)
    assert model.lowbit_recipe.name == {"auto:3.5": "mixed-3.5bpw"}.get(recipe, recipe)
    stored = load_file(folder / "model.safetensors")
    found = digest(model, quantized_only=True)
    assert len(found) >= 14
    expected = digest(_as_module(stored))
    assert found == {k: expected[k] for k in found}
    with torch.no_grad():
        logits = model(torch.arange(16).reshape(1, 16)).logits.float()
    want = load_file(folder / "expected_logits.safetensors")["logits"]
    assert torch.allclose(logits, want, atol=2e-2 * float(want.abs().max()))


def _as_module(tensors: dict) -> torch.nn.Module:
    class Holder(torch.nn.Module):
        def state_dict(self, *a, **k):
            return tensors

    return Holder()
