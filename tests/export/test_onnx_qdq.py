"""Static int8 QDQ ONNX export (``lowbit.export.onnx_qdq``) of a CNN and a tiny BERT, run in
ONNX Runtime: the graph holds lowbit's own codes and scales, ORT reproduces lowbit's output.

Tolerance of ORT against lowbit: both quantize the same float activations with the same
scale and round half to even, then accumulate exact integer products (int8 x int8 sums stay
far below 2^24, so float32 sums of them are exact too) times the same scales. What differs
is the float arithmetic between the quantized layers (summation order in LayerNorm,
softmax, the bias add, erf), a few ulps; a value that lands within those ulps of a rounding
tie (x / s = k + 1/2) takes the neighbouring code in the next layer, one step of that
layer's scale in one element (seen here: x / s = 53.50016 after a float convolution whose
summation order differs between oneDNN and ORT). Hence the bounds: almost every row agrees
to 1e-5 of the output's range, and a row with a flipped code to 1 %.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.export import ExportError, UnsupportedSchemeError
from lowbit.export.onnx_qdq import QdqReport, export_qdq
from lowbit.model.recipe import PRESETS
from lowbit.nn import QuantizedConv2d, QuantizedLinear, WeightSpec

onnx = pytest.importorskip("onnx", reason="the QDQ export needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="running the QDQ model needs onnxruntime")

#: the preset with float32 compute, so lowbit's output is comparable bit for bit
W8A8_STATIC = replace(PRESETS["w8a8-static"], compute_dtype="fp32")


def _cnn(convs: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    if convs:  # weight-only int8 convolutions, as QAT's convert makes them
        spec = WeightSpec("int8", "channel", True, "fp32")
        for i in (0, 3):
            model[i] = QuantizedConv2d.from_float(model[i], spec)
    return model


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quantized_cnn() -> nn.Module:
    calib = [_images(16, s) for s in range(4)]
    return lowbit.quantize(_cnn(), W8A8_STATIC, calib, progress=False)


def _tiny_bert(recipe=W8A8_STATIC):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64)
    model = BertModel(config).eval()
    if recipe is None:
        return model
    gen = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 120, (4, 12), generator=gen),
              "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(3)]
    return lowbit.quantize(model, recipe, calib, progress=False)


def _run(path, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def _tensors(proto) -> dict[str, np.ndarray]:
    return {t.name.removeprefix("model."): onnx.numpy_helper.to_array(t)
            for t in proto.graph.initializer}


def _check_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """Rows (images, tokens) agree to 1e-5 of the output's range, but for the few a rounding
    tie flipped (at most 10 %), which stay within 1 %."""
    diff = np.abs(ours - ref).reshape(-1, ref.shape[-1])
    span = float(np.abs(ref).max())
    assert (diff.max(1) <= 1e-5 * span).mean() >= 0.9, f"max diff {diff.max()} of {span}"
    assert diff.max() <= 0.01 * span


def _check_carried(proto, model: nn.Module) -> None:
    """Every quantized layer's codes and scales are in the graph bit for bit, wired as the
    QDQ format says: DQ(codes) -> MatMul/Conv <- DQ <- QuantizeLinear <- Clip(-127 s)."""
    stored_tensors = _tensors(proto)
    producer = {o: n for n in proto.graph.node for o in n.output}

    def value(name: str) -> np.ndarray:  # the exporter shares equal tensors via Identity
        while name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return stored_tensors[name.removeprefix("model.")]

    tensors = stored_tensors
    checked = 0
    for name, m in model.named_modules():
        if not isinstance(m, (QuantizedLinear, QuantizedConv2d)) or \
                f"{name}.weight_qdata" not in tensors:
            continue
        qp = m.packed_weight().qparams
        codes = m.packed_weight().codes().to(torch.int8).numpy()
        stored = tensors[f"{name}.weight_qdata"]
        assert stored.dtype == np.int8
        if isinstance(m, QuantizedLinear):
            np.testing.assert_array_equal(stored, codes.T)  # [K, N] for MatMul
        else:
            np.testing.assert_array_equal(stored.reshape(len(codes), -1), codes)
        dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0].removeprefix("model.") == f"{name}.weight_qdata")
        assert [a.i for a in dq.attribute if a.name == "axis"] == \
            [1 if isinstance(m, QuantizedLinear) else 0]
        scale = value(dq.input[1])
        assert scale.tobytes() == qp.scale.float().reshape(-1).numpy().tobytes()
        assert not value(dq.input[2]).any()
        op = next(n for n in proto.graph.node if dq.output[0] in n.input)
        assert op.op_type == ("MatMul" if isinstance(m, QuantizedLinear) else "Conv")
        x_dq = producer.get(op.input[0])
        if getattr(m, "activation", None) is None:
            assert x_dq is None or x_dq.op_type != "DequantizeLinear"
        else:
            q = producer[x_dq.input[0]]
            assert (x_dq.op_type, q.op_type, producer[q.input[0]].op_type) == \
                ("DequantizeLinear", "QuantizeLinear", "Clip")
            s = value(q.input[1])
            assert s.tobytes() == m.input_qparams.scale.float().reshape(()).numpy().tobytes()
            assert value(x_dq.input[1]) == s
        checked += 1
    assert checked >= 2


def test_cnn_graph_holds_lowbit_codes_and_scales(tmp_path):
    model = _quantized_cnn()
    report = export_qdq(model, tmp_path / "cnn", example_inputs=_images(2, 9))
    assert isinstance(report, QdqReport)
    assert report.static == ["6", "8"] and report.weight_only == ["0", "3"]
    proto = onnx.load(str(tmp_path / "cnn" / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 6
    _check_carried(proto, model)


def test_cnn_ort_matches_lowbit(tmp_path):
    model = _quantized_cnn()
    export_qdq(model, tmp_path / "cnn", example_inputs=_images(2, 9))
    x = _images(64, 123) * 1.5  # beyond the calibrated range too
    with torch.no_grad():
        ref = model(x).numpy()
    _check_close(_run(tmp_path / "cnn", {"input": x}), ref)


def test_out_of_range_inputs_keep_lowbits_int8_range(tmp_path):
    """lowbit's codes stop at -127, ONNX int8 at -128: inputs far below the calibrated
    range show whether the Clip before QuantizeLinear keeps lowbit's range."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).eval()
    gen = torch.Generator().manual_seed(0)
    lowbit.quantize(mlp, W8A8_STATIC, [torch.randn(32, 16, generator=gen)], progress=False)
    x = 4 * torch.randn(64, 16, generator=gen)
    assert (x / mlp[0].input_qparams.scale < -127.5).float().mean() > 0.1
    export_qdq(mlp, tmp_path / "mlp", example_inputs=x[:2])
    with torch.no_grad():
        ref = mlp(x).numpy()
    _check_close(_run(tmp_path / "mlp", {"input": x}), ref)


def test_bert_through_lb_export(tmp_path):
    model = _tiny_bert()
    report = lowbit.export(model, "onnx", tmp_path / "bert")
    assert isinstance(report, QdqReport) and len(report.static) == 12
    assert report.unused == ["pooler.dense"]  # last_hidden_state does not read it
    proto = onnx.load(str(tmp_path / "bert" / "model.onnx"))
    _check_carried(proto, model)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 120, (3, 19), generator=gen)  # not the traced shape
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    ours = _run(tmp_path / "bert", {"input_ids": ids, "attention_mask": mask})
    _check_close(ours[mask.bool().numpy()], ref[mask.bool().numpy()])


def test_float_models_export_unchanged(tmp_path):
    cnn = _cnn(convs=False)
    report = export_qdq(cnn, tmp_path / "cnn", example_inputs=_images(2, 9))
    assert report.static == report.weight_only == [] and "QuantizeLinear" not in report.ops
    x = _images(32, 5)
    with torch.no_grad():
        np.testing.assert_allclose(_run(tmp_path / "cnn", {"input": x}), cnn(x).numpy(),
                                   rtol=1e-5, atol=1e-5)
    bert = _tiny_bert(None)
    lowbit.export(bert, "onnx", tmp_path / "bert")
    ids = torch.arange(30).reshape(2, 15) % 120
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    np.testing.assert_allclose(
        _run(tmp_path / "bert", {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
        ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe, reason", [("w4g32", "int8 symmetric per-channel"),
                                            ("w8a8-plain", "needs a static")])
def test_schemes_without_qdq_form_are_refused(tmp_path, recipe, reason):
    calib = [_images(8, s) for s in range(2)]
    model = lowbit.quantize(_cnn(convs=False), recipe, calib, progress=False)
    with pytest.raises(UnsupportedSchemeError, match=reason) as err:
        lowbit.export(model, "onnx", tmp_path / "x", example_inputs=_images(2, 0))
    assert "w8a8-static" in str(err.value)
    assert not (tmp_path / "x").exists()


def test_refusals_name_what_exports(tmp_path):
    with pytest.raises(ExportError, match="example_inputs"):
        export_qdq(_cnn(convs=False), tmp_path / "x")
    with pytest.raises(ExportError, match="Llama-family.*QDQ"):
        lowbit.export(nn.Sequential(nn.Linear(4, 4)), "onnx", tmp_path / "y",
                      tokenizer=object())


def test_existing_folder_and_overwrite(tmp_path):
    out, x = tmp_path / "cnn", _images(2, 9)
    export_qdq(_cnn(convs=False), out, example_inputs=x)
    with pytest.raises(ExportError, match="already exists"):
        export_qdq(_quantized_cnn(), out, example_inputs=x)
    report = export_qdq(_quantized_cnn(), out, example_inputs=x, overwrite=True)
    assert report.ops["QuantizeLinear"] == 2
    assert {f.name for f in out.iterdir()} == {"model.onnx"}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="no ONNX export wrote"):
        export_qdq(_cnn(convs=False), mine, example_inputs=x, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
