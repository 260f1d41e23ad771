"""Tests for lowbit.eval.sensitivity: the simulated layer equals QuantizedLinear's reference path,
the model is restored, rows rank by KLD, block mode and the heat map."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.eval.sensitivity import (
    SensitivityError,
    _Simulated,
    block_of,
    layer_sensitivity,
    sensitivity,
)
from lowbit.model import Recipe

FAST = {"window": 32, "n_windows": 1, "progress": False}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run single-threaded: on a busy machine two OpenMP threads spin for ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    """The tiny Llama with its weights scaled up, so its next-token distributions are peaked
    and quantization moves them measurably."""
    from lowbit.model import load_model, load_tokenizer

    model = load_model(tiny_llama_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    return model, load_tokenizer(tiny_llama_dir)


@pytest.mark.parametrize("recipe", ["w4g32", "w8a8", "w8a8-static", "nf4g64"])
def test_simulated_matches_quantized_linear_reference(recipe: str) -> None:
    from lowbit.algorithms import quantize_weight
    from lowbit.formats import get_format, qparams_from_range
    from lowbit.model import Recipe
    from lowbit.nn import QuantizedLinear

    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    scheme = Recipe.parse(recipe).default
    x = torch.randn(3, 5, 64)
    rng = (x.min(), x.max()) if scheme.activation and scheme.activation.mode == "static" else None
    codes, qparams = quantize_weight(linear.weight, scheme.weight, scheme.observer)
    input_qparams = None if rng is None else qparams_from_range(*rng, get_format("int8"),
                                                                symmetric=True)
    q = QuantizedLinear.from_codes(codes, qparams, scheme.weight, linear.bias,
                                   activation=scheme.activation, input_qparams=input_qparams)
    torch.testing.assert_close(_Simulated(linear, scheme, rng)(x), q(x, impl="reference"),
                               rtol=1e-5, atol=1e-5)


def test_block_of() -> None:
    assert block_of("model.layers.12.self_attn.q_proj") == ("model.layers.12", 12,
                                                            "self_attn.q_proj")
    assert block_of("lm_head") == ("lm_head", None, "lm_head")
    assert block_of("encoder.layer.3.attention.self.query")[:2] == ("encoder.layer.3", 3)


def test_layer_sensitivity_measures_and_restores(tiny) -> None:
    model, tok = tiny
    ids = torch.arange(32)[None] % 300
    before = model(ids).logits
    modules = dict(model.named_modules())
    names = ["model.layers.0.mlp.down_proj", "lm_head"]
    w2 = replace(Recipe.parse("w2g16"), rules=())  # the head at 2 bits too, not int8
    kld = layer_sensitivity(model, tok, w2, names=names, n_windows=1, window=32)
    assert list(kld) == names and all(v > 1e-4 for v in kld.values())
    assert all(modules[n] is m for n, m in model.named_modules())  # same modules back
    torch.testing.assert_close(model(ids).logits, before)
    coarse = layer_sensitivity(model, tok, "w8", names=names, n_windows=1, window=32)
    assert all(coarse[n] < kld[n] for n in names)  # 8 bits hurt less than 2


def test_per_block_rows_table_and_heatmap(tiny, tmp_path: Path) -> None:
    from lowbit.eval.report import plot_sensitivity_heatmap

    model, tok = tiny
    res = sensitivity(model, tok, "w4g32", per="block", **FAST)
    assert sorted(r.name for r in res.rows) == ["lm_head", "model.layers.0", "model.layers.1"]
    layer0 = next(r for r in res.rows if r.name == "model.layers.0")
    assert layer0.params == sum(m.weight.numel() for n, m in model.named_modules()
                                if n.startswith("model.layers.0.") and isinstance(m, nn.Linear))
    ranked = res.ranked()
    assert ranked[0].kld_mean >= ranked[-1].kld_mean
    assert res.table().count("\n") == 2 + len(res.rows) - 1
    assert json.loads(json.dumps(res.to_dict()))["per"] == "block"
    png = plot_sensitivity_heatmap(res, tmp_path / "heat.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_requests(tiny) -> None:
    model, tok = tiny
    with pytest.raises(SensitivityError, match="per must be"):
        sensitivity(model, tok, "w8", per="row", **FAST)
    with pytest.raises(SensitivityError, match="not Linear layers the recipe quantizes"):
        sensitivity(model, tok, "w8", names=["model.layers.0.mlp"], **FAST)
    with pytest.raises(SensitivityError, match="quantizes no Linear layer"):
        sensitivity(model, tok, "bf16", **FAST)
    quantized = copy.deepcopy(model)
    from lowbit.model import quantize

    quantize(quantized, "w8", progress=False)
    with pytest.raises(SensitivityError, match="already quantized"):
        sensitivity(quantized, tok, "w8", **FAST)


def test_cli_json(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    from lowbit.cli.main import main

    heat = tmp_path / "s.png"
    rc = main(["sensitivity", str(tiny_llama_dir), "--recipe", "w4g32", "--window", "32",
               "--windows", "1", "--per", "block", "--threads", "1", "--heatmap", str(heat),
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"] == "w4g32" and len(out["rows"]) == 3 and heat.exists()
