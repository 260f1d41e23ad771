"""ONNX export: ONNX Runtime runs the exported decoder to lowbit's numbers.

Tolerances (with ``accuracy_level=0``: float32 products). ORT and lowbit's reference path
(dequantize, float32 matmul; for W8A8 the same int8 activation codes) compute the same
float32 math in another summation order: measured about 2e-7 of the largest logit, bounded
here by ``EXACT`` = 1e-5. lowbit's own fast int4 prefill kernel dequantizes to bf16 (8-bit
mantissa), about 1e-3 from float32 on the tiny model, bounded by ``BF16`` = 5e-3. Greedy
tokens must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
from lowbit.export import ExportError, UnsupportedSchemeError
from lowbit.nn import QuantizedLinear

from .conftest import dequantized_copy, tiny_decoder

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime "
                          "(pip install onnx onnxruntime)")
onnx = pytest.importorskip("onnx", reason="ONNX export tests need the onnx package")

from lowbit.export.to_onnx import (  # noqa: E402
    empty_cache,
    export_onnx,
    generate,
    session,
    step,
)

EXACT, BF16 = 1e-5, 5e-3
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61, 120, 8, 33, 201]])


def _calibration():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 300, (1, 32), generator=g) for _ in range(4)]


def _model(recipe: str):
    if recipe == "float":
        return tiny_decoder()
    data = _calibration() if "static" in recipe else None
    return lowbit.quantize(tiny_decoder(), recipe, data).float()


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


@pytest.mark.parametrize("recipe", [
    "float", "w4g32", "w4g64", "gguf:q4_0", "w4g64-izp", "w4", "w2g16", "w8", "w8g32",
    "w8g32-izp", "w8a8-plain", "w8a8", "w8a8-static", "w4g64-rot"])
def test_ort_logits_and_greedy_tokens_match_lowbit(recipe, tmp_path, tiny_tok):
    model = _model(recipe)
    report = export_onnx(model, tmp_path / "onnx", tokenizer=tiny_tok, accuracy_level=0)
    sess = session(report.path, threads=1)
    logits, _ = step(sess, PROMPT.numpy(), empty_cache(sess))
    with torch.no_grad():
        own = model(PROMPT).logits.float().numpy()
        w8a8 = any(m.activation is not None for m in model.modules()
                   if isinstance(m, QuantizedLinear))
        # lowbit's float32 math: W8A8 layers' own path; weight-only: its dequantized weights
        ref = own if w8a8 else dequantized_copy(model)(PROMPT).logits.float().numpy()
    assert _rel(logits, ref) < EXACT
    assert _rel(logits, own) < BF16
    assert generate(sess, PROMPT[0].numpy(), 8) == _greedy(model, PROMPT, 8)
    quantized = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    assert report.carried == quantized
    kernel = "MatMulInteger" if w8a8 else "com.microsoft.MatMulNBits"
    assert report.ops.get(kernel, 0) == quantized
    # MatMuls: 2 per attention (2 layers), one per rotated layer, one per float linear, one
    # per layer with float zero-points (its block offsets)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    rotated = sum(m.spec.rotation is not None for m in layers)
    offsets = sum(not m.spec.symmetric and m.packed_weight().qparams.zero_point
                  .is_floating_point() for m in layers)
    assert (rotated > 0) == (recipe in ("w8a8", "w4g64-rot"))
    assert report.ops["MatMul"] == 4 + rotated + len(report.float_layers) + offsets


def test_kv_cache_steps_equal_one_full_forward(tmp_path, tiny_tok):
    report = export_onnx(_model("w4g32"), tmp_path / "onnx", tokenizer=tiny_tok)
    sess = session(report.path, threads=1)
    full, _ = step(sess, PROMPT.numpy(), empty_cache(sess))
    logits, cache = step(sess, PROMPT[:, :8].numpy(), empty_cache(sess))
    assert cache["past_key_values.0.key"].shape == (1, 2, 8, 16)
    parts = [logits]
    for t in range(8, PROMPT.shape[1]):
        logits, cache = step(sess, PROMPT[:, t:t + 1].numpy(), cache)
        parts.append(logits)
    assert _rel(np.concatenate(parts, axis=1), full) < EXACT
    assert cache["past_key_values.1.value"].shape == (1, 2, PROMPT.shape[1], 16)


def test_left_padding_is_masked(tmp_path, tiny_tok):
    report = export_onnx(_model("w4g64"), tmp_path / "onnx", tokenizer=tiny_tok)
    sess = session(report.path, threads=1)
    alone, _ = step(sess, PROMPT[:, 4:].numpy(), empty_cache(sess))
    ids = np.stack([PROMPT[0].numpy(), np.r_[[0] * 4, PROMPT[0, 4:].numpy()]])
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    positions = np.stack([np.arange(12), np.r_[[0] * 4, np.arange(8)]])
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
             **empty_cache(sess, batch=2)}
    batch = sess.run(["logits"], feeds)[0]
    assert _rel(batch[1:, 4:], alone) < EXACT


def test_matmulnbits_holds_lowbit_codes_bit_exactly(tmp_path, tiny_tok):
    from onnx import numpy_helper

    model = _model("w4g64-izp")
    report = export_onnx(model, tmp_path / "onnx", tokenizer=tiny_tok)
    proto = onnx.load(str(report.path / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits"
                and n.input[1] == "model.layers.0.mlp.down_proj.qweight")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    K, N = layer.in_features, layer.out_features
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (K, N, 4, 64)
    B = inits[node.input[1]]
    blocks = -(-K // 64)
    assert B.shape == (N, blocks, 32) and B.dtype == np.uint8
    codes = np.stack([B & 15, B >> 4], axis=-1).reshape(N, -1)[:, :K]  # low nibble first
    packed = layer.packed_weight()
    assert np.array_equal(codes, packed.codes().numpy())
    zeros = inits[node.input[3]].reshape(N, -1)
    zeros = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(N, -1)[:, :blocks]
    assert np.array_equal(zeros, packed.qparams.zero_point.reshape(N, -1).numpy())
    assert np.array_equal(inits[node.input[2]], packed.qparams.scale.float().reshape(N, -1))


def test_zero_points_symmetric_none_integer_packed_float_as_block_offsets(tmp_path, tiny_tok):
    from onnx import numpy_helper

    for recipe in ("gguf:q4_0", "w4g32", "w4g32-izp"):
        model = _model(recipe)
        proto = onnx.load(str(export_onnx(model, tmp_path / recipe,
                                          tokenizer=tiny_tok).path / "model.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
        layer = model.get_submodule(node.input[1].removesuffix(".qweight"))
        # absent zero-point: 2^(bits-1), the +8 shift of int4 codes and the c of the offsets
        assert len(node.input) == (4 if recipe.endswith("-izp") else 3)
        offsets = inits.get(node.input[1].replace(".qweight", ".block_offsets"))
        if recipe != "w4g32":
            assert offsets is None
            continue
        qp = layer.packed_weight().qparams  # (q - z) s = (q - 8) s + (8 - z) s
        want = ((8 - qp.zero_point.double()) * qp.scale.double()).reshape(layer.out_features, -1)
        assert offsets.dtype == np.float32
        torch.testing.assert_close(torch.from_numpy(offsets).double().T, want, rtol=1e-6, atol=0)


def test_default_runs_8bit_layers_with_int8_activations(tmp_path, tiny_tok):
    """The default accuracy level: 0 for 4-bit layers, 4 (ORT's fast 8-bit path: int8
    activations per block) for the 8-bit head, within 2e-2 of lowbit (measured 4e-3)."""
    model = _model("w4g32")
    report = export_onnx(model, tmp_path / "onnx", tokenizer=tiny_tok)
    proto = onnx.load(str(report.path / "model.onnx"))
    levels = {n.input[1].removesuffix(".qweight"): onnx.helper.get_attribute_value(a)
              for n in proto.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels.pop("lm_head") == 4 and set(levels.values()) == {0}
    assert "accuracy_level 4 on 8-bit layers" in str(report)
    sess = session(report.path, threads=1)
    logits, _ = step(sess, PROMPT.numpy(), empty_cache(sess))
    with torch.no_grad():
        ref = dequantized_copy(model)(PROMPT).logits.float().numpy()
    assert EXACT < _rel(logits, ref) < 2e-2


def test_ort_dynamic_activations_stay_close(tmp_path, tiny_tok):
    model = _model("w8a8-plain")
    report = export_onnx(model, tmp_path / "onnx", tokenizer=tiny_tok,
                         activations="ort-dynamic")
    assert report.ops["DynamicQuantizeLinear"] == report.carried
    assert "per tensor" in str(report)
    sess = session(report.path, threads=1)
    logits, _ = step(sess, PROMPT.numpy(), empty_cache(sess))
    with torch.no_grad():
        own = model(PROMPT).logits.float().numpy()
    # one uint8 scale for all 12 tokens instead of one int8 scale per token: ~1e-2 measured
    assert EXACT < _rel(logits, own) < 5e-2


@pytest.mark.parametrize("recipe, nearest", [
    ("nf4g64", "w4g64"), ("fp8", "w8"), ("w3g64", "w4g64"), ("kmeans4", "w4g32"),
    ("w4a8", "w8a8-plain")])
def test_unsupported_schemes_are_refused_with_the_nearest_recipe(recipe, nearest, tmp_path,
                                                                  tiny_tok):
    data = _calibration() if recipe == "kmeans4" else None
    model = lowbit.quantize(tiny_decoder(), recipe, data)
    with pytest.raises(UnsupportedSchemeError, match=f"'?{nearest}'?"):
        export_onnx(model, tmp_path / "onnx", tokenizer=tiny_tok)
    assert not (tmp_path / "onnx").exists()


def test_non_decoder_is_refused(tmp_path, tiny_tok):
    with pytest.raises(ExportError, match="Llama-family"):
        export_onnx(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "x",
                    tokenizer=tiny_tok)


def test_folder_contents_exists_and_overwrite(tmp_path, tiny_tok):
    out = tmp_path / "onnx"
    report = export_onnx(_model("w8"), out, tokenizer=tiny_tok)
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    assert report.onnx_bytes == (out / "model.onnx").stat().st_size
    with pytest.raises(ExportError, match="already exists"):
        export_onnx(_model("w8"), out, tokenizer=tiny_tok)
    export_onnx(_model("w4g32"), out, tokenizer=tiny_tok, overwrite=True)
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="no ONNX export wrote"):
        export_onnx(_model("w8"), mine, tokenizer=tiny_tok, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious"


def test_interrupted_export_leaves_nothing(tmp_path):
    class Failing:
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_onnx(_model("w8"), tmp_path / "onnx", tokenizer=Failing())
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_checkpoint_that_ort_runs(tmp_path, tiny_llama_dir, capsys):
    from lowbit.cli.main import main

    model = lowbit.load_model(tiny_llama_dir)
    lowbit.quantize(model, "w4g32")
    ckpt = lowbit.save(model, tmp_path / "ckpt", tokenizer=lowbit.load_tokenizer(tiny_llama_dir))
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), "--to", "onnx", "-o", str(out)]) == 0
    assert "MatMulNBits" in capsys.readouterr().out
    ids = PROMPT[:, :6]
    ours = _greedy(lowbit.load(ckpt).float(), ids, 4)
    assert generate(session(out), ids.numpy(), 4) == ours
    assert main(["export", str(ckpt), "--to", "onnx", "-o", str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
