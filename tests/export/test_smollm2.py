"""SmolLM2 (the bundled real model) through the GGUF export and back (``real_model``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

import lowbit  # noqa: E402
from lowbit.export.gguf_check import compare_weights  # noqa: E402

from .conftest import dequantized_copy, logits  # noqa: E402


@pytest.mark.real_model
def test_smollm2_w8_round_trip(tmp_path):
    model = lowbit.load_model("smollm2-135m")
    tokenizer = lowbit.load_tokenizer("smollm2-135m")
    lowbit.quantize(model, "w8")
    report = lowbit.export(model, "gguf", tmp_path / "w8.gguf", tokenizer=tokenizer,
                           embedding_type="f32")
    assert report.tokenizer_pre == "smollm"  # what the bundled SmolLM2 GGUF says
    assert report.types == {"f32": 62, "q8_0": 211}
    diffs = compare_weights(model, report.path)
    assert diffs["q8_0"].max_rel <= 2.0**-11 * 1.01 and diffs["f32"].max_abs == 0
    back = lowbit.load_model(report.path)
    ids = torch.tensor([tokenizer("def quantize(model, recipe):\n    return")["input_ids"]])
    ref = logits(dequantized_copy(model), ids)
    assert (logits(back, ids) - ref).abs().max() <= 2e-3 * ref.abs().max()
