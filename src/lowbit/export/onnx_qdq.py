"""A CNN or encoder quantized by lowbit as a static int8 QDQ ONNX model ONNX Runtime runs.

Each quantized layer becomes the QDQ pattern (ONNX Runtime, "Quantize ONNX models", QDQ
format: float tensors with QuantizeLinear / DequantizeLinear pairs around the ops that run
quantized; ORT fuses ``DQ -> MatMul/Conv (-> Q)`` into its int8 kernels where it can) with
lowbit's own numbers, so ONNX Runtime runs lowbit's quantization and not its own:

- input (``w8a8-static``): ``Clip(x, min=-127*s) -> QuantizeLinear(s, 0) ->
  DequantizeLinear(s, 0)`` with the layer's calibrated per-tensor scale ``s``. ONNX
  QuantizeLinear (opset 13+) computes ``saturate(round(x / s) + zero_point)`` with round
  half to even, as ``torch.round``; its int8 saturates to [-128, 127] while lowbit's
  symmetric codes stop at -127, which the Clip restores;
- weight: ``DequantizeLinear(qdata, scale, 0, axis)`` (per-axis since opset 13: ``y = (x -
  x_zero_point) * x_scale`` along ``axis``) over lowbit's int8 codes and per-channel scales,
  unchanged: a Linear's codes are stored transposed, ``[K, N]`` with ``axis=1``, so they
  feed MatMul directly; a Conv's ``[O, I/groups, kh, kw]`` with ``axis=0``;
- a Hadamard-rotated input (``w8a8-static-rot``): a MatMul by the rotation matrix first.

Weight-only int8 per-channel layers (``w8``, QAT's ``QuantizedConv2d``) get the weight DQ
only and compute in float, as lowbit does. Weight-only 4-bit, codebooks, FP8 and dynamic
(per-token) activations have no static int8 QDQ form (ORT's QDQ needs a calibrated scale):
``UnsupportedSchemeError`` names ``w8a8-static``.

Route: ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``; it needs no
onnxscript) of the model with each quantized layer swapped, for the export only, for a
stand-in whose Q/DQ nodes come from ``torch.autograd.Function.symbolic``. The nodes are
emitted by the module that owns the numbers (no matching of nodes to modules afterwards),
the initializers keep the module's path (``<layer>.weight_qdata``, ``.weight_scale``,
``.input_scale``...), and the rest of the model (attention, LayerNorm, GELU, pooling, BN)
is the exporter's own translation. The graph computes in float32 (a model quantized with a
bf16 / fp16 compute dtype has its float weights widened, exactly, for the export) and is
opset 17, IR version 8 (ORT reads <= 13).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.export.gguf_weights import ExportError, UnsupportedSchemeError
from lowbit.export.onnx_folder import MODEL, check_target, write_folder
from lowbit.formats import get_format, rotate
from lowbit.nn import QuantizedConv2d, QuantizedLinear

OPSET = 17
IR_VERSION = 8
NEAREST = "w8a8-static"
QMAX = 127  # lowbit's symmetric int8 range is [-127, 127]


@dataclass
class QdqReport:
    """What ``export_qdq`` wrote."""

    path: Path
    onnx_bytes: int
    static: list[str] = field(default_factory=list)  # Q/DQ input + DQ weight
    weight_only: list[str] = field(default_factory=list)  # DQ weight, float compute
    float_layers: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # quantized, but not on the output's path
    ops: dict[str, int] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.path}: static int8 QDQ ONNX model, {self.onnx_bytes / 2**20:.2f} MiB; "
                f"{len(self.static)} layers with lowbit's activation and weight codes, "
                f"{len(self.weight_only)} weight-only int8, {len(self.float_layers)} float "
                f"({self.ops.get('QuantizeLinear', 0)} QuantizeLinear, "
                f"{self.ops.get('DequantizeLinear', 0)} DequantizeLinear); inputs "
                f"{', '.join(self.inputs)} -> {', '.join(self.outputs)}; unused: "
                f"{', '.join(self.unused) or 'none'}")


# -- which layers have a QDQ form ------------------------------------------------------
def qdq_form(name: str, module: nn.Module) -> str:
    """``"static"`` (Q/DQ input + DQ weight) or ``"weight"`` (DQ weight) for a lowbit layer;
    ``UnsupportedSchemeError`` naming the nearest recipe for a scheme without a QDQ form."""
    spec = module.spec
    fmt, gran = get_format(spec.format), spec.granularity
    where = f"{name} ({spec.format}, {gran}"
    if not (fmt.name == "int8" and gran.kind == "channel" and gran.axis == 0
            and spec.symmetric):
        raise UnsupportedSchemeError(
            f"{where}): only int8 symmetric per-channel weights have a static int8 QDQ form "
            f"(DequantizeLinear with axis); quantize with {NEAREST!r} (Llama-family decoders "
            "export their 4-bit layers as MatMulNBits instead)")
    if isinstance(module, QuantizedConv2d):
        return "weight"
    if getattr(module, "outlier_index", None) is not None:
        raise UnsupportedSchemeError(f"{where}): float outlier columns have no QDQ form; "
                                     f"quantize with {NEAREST!r}")
    act = module.activation
    if act is None:
        return "weight"
    if act.mode != "static":
        raise UnsupportedSchemeError(
            f"{where}, {act.mode} activations): ONNX Runtime's QDQ format needs a static "
            f"activation scale, lowbit's {act.mode} scales are computed per token at run "
            f"time; quantize with {NEAREST!r} and calibration data")
    return "static"  # lowbit's int8 kernel is symmetric: zero-point 0


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Every lowbit layer of ``model`` -> its QDQ form (``qdq_form``)."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__.startswith("FakeQuant"):
            raise ExportError(f"{name} is a QAT fake-quantized layer: convert the model "
                              "(lowbit.training.qat.convert) before exporting")
        if isinstance(module, (QuantizedLinear, QuantizedConv2d)):
            out[name] = qdq_form(name, module)
    return out


# -- the Q/DQ nodes --------------------------------------------------------------------
class _QuantDequant(torch.autograd.Function):
    """lowbit's static int8 fake quantization; ONNX: Clip -> QuantizeLinear -> DQ."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, lower):
        return torch.round(x / scale).clamp(-QMAX, QMAX) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, lower):
        q = g.op("QuantizeLinear", g.op("Clip", x, lower), scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _DequantizeWeight(torch.autograd.Function):
    """``qdata * scale`` along ``axis``; ONNX: DequantizeLinear(axis)."""

    @staticmethod
    def forward(ctx, qdata, scale, zero_point, axis):
        shape = [1] * qdata.dim()
        shape[axis] = -1
        return (qdata.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, qdata, scale, zero_point, axis):
        return g.op("DequantizeLinear", qdata, scale, zero_point, axis_i=axis)


class _QdqLayer(nn.Module):
    """Stand-in for a lowbit layer during the export: its codes and scales as buffers."""

    def __init__(self, module: nn.Module, form: str, codes: torch.Tensor) -> None:
        super().__init__()
        qp = module.packed_weight().qparams
        n = qp.scale.numel()
        self.register_buffer("weight_qdata", codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", qp.scale.float().reshape(n).clone())
        self.register_buffer("weight_zero_point", torch.zeros(n, dtype=torch.int8))
        bias = None if module.bias is None else module.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        self.static = form == "static"
        if self.static:
            s = module.input_qparams.scale.float().reshape(())
            self.register_buffer("input_scale", s.clone())
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int8))
            self.register_buffer("input_clip_min", (-QMAX * s).clone())

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static:
            return x
        return _QuantDequant.apply(x, self.input_scale, self.input_zero_point,
                                   self.input_clip_min)


class QdqLinear(_QdqLayer):
    """``[rotation MatMul] -> Q/DQ -> MatMul(DQ(W^T codes)) -> Add(bias)``."""

    def __init__(self, module: QuantizedLinear, form: str) -> None:
        super().__init__(module, form, module.packed_weight().codes().T)
        rotation = module.spec.rotation
        self.rotation = None
        if rotation is not None:
            eye = torch.eye(module.in_features, dtype=torch.float64)
            self.rotation = rotate(eye, rotation).float()  # rotate(x) == x @ rotate(I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.rotation is not None:
            x = torch.matmul(x, self.rotation)
        w = _DequantizeWeight.apply(self.weight_qdata, self.weight_scale,
                                    self.weight_zero_point, 1)
        y = torch.matmul(self.quant_input(x), w)
        return y if self.bias is None else y + self.bias


class QdqConv2d(_QdqLayer):
    """``Conv(x, DQ(codes, axis=0), bias)``."""

    def __init__(self, module: QuantizedConv2d, form: str) -> None:
        codes = module.packed_weight().codes()
        super().__init__(module, form, codes.reshape(module.out_channels, -1, *module.kernel_size))
        self.args = (module.stride, module.padding, module.dilation, module.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _DequantizeWeight.apply(self.weight_qdata, self.weight_scale,
                                    self.weight_zero_point, 0)
        return F.conv2d(self.quant_input(x.float()), w, self.bias, *self.args)


# -- inputs ----------------------------------------------------------------------------
class _TextEncoder(nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state`` (or ``logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


def takes_text(model: nn.Module) -> bool:
    """A Hugging Face model read through ``input_ids``."""
    return hasattr(getattr(model, "config", None), "to_dict") and \
        getattr(model, "main_input_name", None) == "input_ids"


def _traced(model: nn.Module, example_inputs):
    """(module to trace, example args, input names, output name, dynamic axes)."""
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
        axes = {n: {0: "batch"} for n in [*names, "output"]}
        return model, tuple(args), names, "output", axes
    if not takes_text(model):
        raise ExportError(f"{type(model).__name__} is not a Hugging Face text model: pass "
                          "example_inputs= (a tensor or tuple, batch first) to trace it with")
    vocab = int(getattr(model.config, "vocab_size", 2))
    ids = torch.arange(16).remainder(vocab).reshape(2, 8)
    wrapper = _TextEncoder(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    output = "last_hidden_state" if getattr(out, "last_hidden_state", None) is not None \
        else "logits"
    seq = {0: "batch", 1: "sequence"}
    axes = {"input_ids": seq, "attention_mask": seq,
            output: seq if output == "last_hidden_state" else {0: "batch"}}
    return wrapper, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], output, axes


# -- the export ------------------------------------------------------------------------
def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def build_proto(model: nn.Module, layers: dict[str, str], example_inputs=None):
    """(``onnx.ModelProto``, input names, output name) of ``model`` with ``layers``' QDQ."""
    import io
    import warnings

    try:
        import onnx
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx package: pip install 'lowbit[onnx]'") \
            from exc
    originals = {name: model.get_submodule(name) for name in layers}
    was_training, widened = model.training, {}
    try:
        for name, form in layers.items():
            cls = QdqConv2d if isinstance(originals[name], QuantizedConv2d) else QdqLinear
            _set(model, name, cls(originals[name], form))
        for t in [*model.parameters(), *model.buffers()]:  # bf16/fp16 compute -> float32
            if t.is_floating_point() and t.dtype != torch.float32:
                widened[t] = t.dtype
                t.data = t.data.float()
        model.eval()
        traced, args, names, output, axes = _traced(model, example_inputs)
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
            torch.onnx.export(traced, args, buf, dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=[output], dynamic_axes=axes,
                              do_constant_folding=True)
    finally:
        for t, dtype in widened.items():
            t.data = t.data.to(dtype)  # exact: they were widened
        for name, module in originals.items():
            _set(model, name, module)
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    onnx.checker.check_model(proto)
    return proto, names, output


def export_qdq(model, path: str | os.PathLike, *, overwrite: bool = False, tokenizer=None,
               example_inputs=None) -> QdqReport:
    """Write ``model`` (an ``nn.Module`` or anything ``lowbit.load_model`` opens: float, or
    quantized by lowbit with int8 per-channel weights and static or no activation
    quantization) as a folder holding ``model.onnx`` (+ ``config.json`` and the tokenizer's
    files for a Hugging Face model). A Hugging Face text model is traced as
    ``(input_ids, attention_mask) -> last_hidden_state`` (or ``logits``), batch and
    sequence dynamic; anything else needs ``example_inputs`` (batch dynamic)."""
    target = check_target(path, overwrite)
    if not isinstance(model, nn.Module):
        from lowbit.export.hf_checkpoint import load_with_tokenizer

        model, tokenizer = load_with_tokenizer(model, tokenizer)
    layers = quantized_layers(model)
    proto, names, output = build_proto(model, layers, example_inputs)
    recipe = getattr(model, "lowbit_recipe", None)
    proto.metadata_props.add(key="lowbit.producer", value="lowbit")
    proto.metadata_props.add(key="lowbit.recipe", value=getattr(recipe, "name", None) or "float")
    write_folder(proto, target, overwrite, model, tokenizer)
    kinds = (nn.Linear, nn.Conv2d)
    stored = {t.name.removeprefix("model.") for t in proto.graph.initializer}
    present = {n: f for n, f in layers.items() if f"{n}.weight_qdata" in stored}
    return QdqReport(target, (target / MODEL).stat().st_size,
                     [n for n, f in present.items() if f == "static"],
                     [n for n, f in present.items() if f == "weight"],
                     [n for n, m in model.named_modules() if type(m) in kinds],
                     [n for n in layers if n not in present],
                     dict(Counter(node.op_type for node in proto.graph.node)), names, [output])


def open_model(model, tokenizer, example_inputs):
    """For ``to_onnx.export_onnx``: (model, tokenizer, True) when ``model`` goes to
    ``export_qdq`` (not a Llama-family decoder, and quantized by lowbit, or given
    ``example_inputs``, or a Hugging Face encoder); (model, tokenizer, False) for the
    decoder path; ``ExportError`` naming what exports for anything else."""
    from lowbit.export.hf_checkpoint import load_with_tokenizer
    from lowbit.runtime.arch import UnsupportedModelError, resolve_decoder

    if not isinstance(model, nn.Module):
        model, tokenizer = load_with_tokenizer(model, tokenizer)
    try:
        resolve_decoder(model)
        return (*load_with_tokenizer(model, tokenizer), False)
    except UnsupportedModelError as exc:
        reason = exc
    generates = callable(getattr(model, "can_generate", None)) and model.can_generate()
    if not generates and (example_inputs is not None or takes_text(model)
                          or any(isinstance(m, (QuantizedLinear, QuantizedConv2d))
                                 for m in model.modules())):
        if tokenizer is None and getattr(model, "lowbit_spec", None):
            try:
                tokenizer = load_with_tokenizer(model, None)[1]
            except Exception:  # noqa: BLE001 - the tokenizer is optional for a QDQ folder
                tokenizer = None
        return model, tokenizer, True
    raise ExportError(
        "ONNX export writes Llama-family decoders (Llama, Mistral, Qwen2; MatMulNBits, KV "
        "cache) and, as static int8 QDQ, CNNs and encoders quantized with 'w8a8-static' "
        f"(or float, given example_inputs=): {reason}")
