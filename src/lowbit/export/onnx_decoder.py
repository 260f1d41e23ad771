"""A Llama-family decoder (Llama, Mistral, Qwen2: ``lowbit.runtime.arch``'s table) as one
ONNX graph with a KV cache.

The graph is built node by node from the module table rather than traced with
``torch.onnx.export``: tracing a transformers model with its cache object depends on the
transformers and torch versions (and the dynamo exporter on onnxscript), and a
``QuantizedLinear`` would still need a custom translation to ``MatMulNBits``. Built here,
every linear is whatever ``onnx_graph.linear`` makes of it, and the math is the
transformers Llama forward written out in standard ONNX ops (opset 17) beside the
``com.microsoft`` quantized matmuls:

- RMSNorm ``x / sqrt(mean(x^2) + eps) * w`` (the pattern ORT fuses into
  SimplifiedLayerNormalization), rotary embeddings from the model's own rotary module
  (``rope_tables``: scaled RoPE variants come out as the model computes them), gated SiLU
  MLP;
- attention with grouped KV heads: the queries of each KV head are stacked
  (``[b, kv, rep * s, d]``) so one MatMul serves the group (transformers' ``repeat_kv``
  order: head h reads KV head h // rep); the mask is causal over ``past + s`` keys, within
  the sliding window if any, and hides keys whose ``attention_mask`` is 0.

Inputs (the names optimum and onnxruntime-genai use): ``input_ids`` [batch, seq] int64,
``attention_mask`` [batch, past + seq] int64, ``position_ids`` [batch, seq] int64,
``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past, head_dim] float32 (past = 0
for a prompt). Outputs: ``logits`` [batch, seq, vocab] float32 and ``present.{i}.key`` /
``.value`` [batch, kv_heads, past + seq, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from lowbit.export.gguf_weights import ExportError
from lowbit.export.onnx_graph import Graph, linear
from lowbit.nn import QuantizedLinear
from lowbit.runtime.arch import UnsupportedModelError, resolve_decoder, rope_tables

OPSET = 17
IR_VERSION = 8  # opset 17's; ORT 1.31 reads IR <= 13
_NEG = float(np.finfo(np.float32).min)  # masked scores, as transformers' eager mask
_BOOL, _FLOAT = 9, 1  # onnx.TensorProto data types


@dataclass
class DecoderFacts:
    """What the graph holds, for the report."""

    layers: int
    kv_heads: int
    head_dim: int
    carried: list[str] = field(default_factory=list)  # lowbit's codes, unchanged
    float_linears: list[str] = field(default_factory=list)


def _spec(model: nn.Module):
    try:
        spec = resolve_decoder(model)
    except UnsupportedModelError as exc:
        raise ExportError(f"ONNX export builds Llama-family decoders (Llama, Mistral, Qwen2): "
                          f"{exc}") from exc
    if spec.hidden_act not in ("silu", "swish"):
        raise ExportError(f"hidden_act {spec.hidden_act!r} is not exported (the graph's MLP is "
                          "SiLU-gated, as Llama's)")
    return spec


class _Decoder:
    def __init__(self, model: nn.Module, options: dict) -> None:
        self.spec = _spec(model)
        self.names = {id(m): n for n, m in model.named_modules()}
        self.options = options
        self.g = Graph()
        s = self.spec
        self.facts = DecoderFacts(len(s.layers), s.num_kv_heads, s.head_dim)

    def linear(self, x: str, module: nn.Module) -> str:
        name = self.names[id(module)]
        kind = self.facts.carried if isinstance(module, QuantizedLinear) else \
            self.facts.float_linears
        kind.append(name)
        return linear(self.g, x, name, module, **self.options)

    def norm(self, x: str, module: nn.Module) -> str:
        g = self.g
        var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), axes=[-1],
                   keepdims=1)
        y = g.op("Div", x, g.op("Sqrt", g.op("Add", var, g.const(self.spec.rms_norm_eps,
                                                                    np.float32))))
        weight = module.weight.detach().float().numpy()
        return g.op("Mul", y, g.init(f"{self.names[id(module)]}.weight", weight))

    def rope(self, x: str, cos: str, sin: str) -> str:
        """transformers' ``x * cos + rotate_half(x) * sin`` on ``[b, heads, s, d]``."""
        g, half = self.g, self.spec.head_dim // 2
        x1, x2 = g.op("Split", x, g.const([half, half]), axis=-1, outputs=2)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def mask(self, past: str) -> str:
        """Additive ``[b, 1, s, past + s]`` mask: 0 where a query may read a key."""
        g = self.g
        seq = g.op("Gather", g.op("Shape", "input_ids"), g.const(1))
        total = g.op("Add", past, seq)
        qpos = g.op("Range", past, total, g.const(1))
        kpos = g.op("Range", g.const(0), total, g.const(1))
        qcol, krow = g.op("Unsqueeze", qpos, g.const([1])), g.op("Unsqueeze", kpos, g.const([0]))
        allowed = g.op("LessOrEqual", krow, qcol)
        window = self.spec.sliding_window
        if window is not None and window < self.spec.max_position_embeddings:
            near = g.op("Less", g.op("Sub", qcol, krow), g.const(window))
            allowed = g.op("And", allowed, near)
        pad = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2])), to=_BOOL)
        allowed = g.op("And", allowed, pad)
        return g.op("Where", allowed, g.const(0.0, np.float32), g.const(_NEG, np.float32))

    def attention(self, i: int, x: str, layer, cos: str, sin: str, mask: str) -> str:
        g, s = self.g, self.spec
        H, KV, d = s.num_heads, s.num_kv_heads, s.head_dim

        def heads(y: str, n: int) -> str:  # [b, s, n*d] -> [b, n, s, d]
            return g.op("Transpose", g.op("Reshape", y, g.const([0, 0, n, d])),
                        perm=[0, 2, 1, 3])

        q = self.rope(heads(self.linear(x, layer.q_proj), H), cos, sin)
        k = self.rope(heads(self.linear(x, layer.k_proj), KV), cos, sin)
        v = heads(self.linear(x, layer.v_proj), KV)
        k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, out=f"present.{i}.key")
        v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, out=f"present.{i}.value")
        grouped = g.op("Reshape", q, g.const([0, KV, -1, d]))  # [b, kv, rep*s, d]
        scores = g.op("Mul", g.op("MatMul", grouped, g.op("Transpose", k, perm=[0, 1, 3, 2])),
                      g.const(s.attn_scale, np.float32))
        scores = g.op("Add", g.op("Reshape", scores, g.const([0, H, -1, 0])), mask)
        probs = g.op("Reshape", g.op("Softmax", scores, axis=-1), g.const([0, KV, -1, 0]))
        ctx = g.op("Reshape", g.op("MatMul", probs, v), g.const([0, H, -1, d]))
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, H * d]))
        return self.linear(ctx, layer.o_proj)

    def mlp(self, x: str, layer) -> str:
        g = self.g
        gate = self.linear(x, layer.gate_proj)
        act = g.op("Mul", gate, g.op("Sigmoid", gate))
        return self.linear(g.op("Mul", act, self.linear(x, layer.up_proj)), layer.down_proj)

    def head(self, x: str, embed: str) -> str:
        s = self.spec
        head, table = s.lm_head, s.embed.weight
        if type(head) is nn.Linear and head.weight.data_ptr() == table.data_ptr() \
                and head.bias is None:  # tied: reuse the embedding, transposed at load
            self.facts.float_linears.append(self.names[id(head)])
            return self.g.op("MatMul", x, self.g.op("Transpose", embed, perm=[1, 0]))
        return self.linear(x, head)

    def build(self):
        from onnx import TensorProto, helper

        g, s = self.g, self.spec
        embed = g.init(f"{self.names[id(s.embed)]}.weight", s.embed.weight.detach().float().numpy())
        cos_table, sin_table = rope_tables(s, s.max_position_embeddings)
        cos = g.op("Unsqueeze", g.op("Gather", g.init("rope.cos", cos_table.numpy()),
                                     "position_ids"), g.const([1]))
        sin = g.op("Unsqueeze", g.op("Gather", g.init("rope.sin", sin_table.numpy()),
                                     "position_ids"), g.const([1]))
        past = g.op("Gather", g.op("Shape", "past_key_values.0.key"), g.const(2))
        mask = self.mask(past)
        x = g.op("Gather", embed, "input_ids")
        for i, layer in enumerate(s.layers):
            x = g.op("Add", x, self.attention(i, self.norm(x, layer.input_norm), layer, cos,
                                              sin, mask))
            x = g.op("Add", x, self.mlp(self.norm(x, layer.post_attention_norm), layer))
        g.op("Identity", self.head(self.norm(x, s.final_norm), embed), out="logits")

        kv = ["batch_size", s.num_kv_heads, "past_sequence_length", s.head_dim]
        present = ["batch_size", s.num_kv_heads, "total_sequence_length", s.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", s.lm_head.out_features])]
        for i in range(len(s.layers)):
            for part in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{part}", TensorProto.FLOAT, kv))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{part}", TensorProto.FLOAT, present))
        graph = helper.make_graph(g.nodes, "lowbit_decoder", inputs, outputs, g.initializers)
        model = helper.make_model(graph, ir_version=IR_VERSION, producer_name="lowbit",
                                  opset_imports=[helper.make_opsetid("", OPSET),
                                                 helper.make_opsetid("com.microsoft", 1)])
        return model, self.facts, g.ops


def decoder_model(model: nn.Module, *, accuracy_level: int | None = None,
                  activations: str = "per-token"):
    """(``onnx.ModelProto``, ``DecoderFacts``, op counts) of ``model``'s decoder graph."""
    return _Decoder(model, {"accuracy_level": accuracy_level,
                            "activations": activations}).build()
