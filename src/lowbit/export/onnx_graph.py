"""A small ONNX graph builder and lowbit's linear layers as ONNX nodes.

Every linear layer becomes ``y = linear(x)`` on a float32 ``[..., K]`` input:

- ``nn.Linear`` -> ``MatMul`` by the float32 ``W^T`` (``Add`` of the bias);
- weight-only ``QuantizedLinear`` (2, 4 or 8 bits) -> ``com.microsoft.MatMulNBits``
  (ONNX Runtime contrib op, ``docs/ContribOperators.md#com.microsoft.MatMulNBits``):
  B is uint8 ``[N, ceil(K/bs), bs*bits/8]`` (codes along the input, low bits first),
  scales float ``[N, ceil(K/bs)]``, and the op computes ``x = (q - zero_point) * scale``:
  lowbit's own formula, so lowbit's codes are carried unchanged. Signed codes are shifted
  by 2^(bits-1) to unsigned, which is the op's default zero-point when none is given, so a
  symmetric layer has no zero-point input; integer zero-points are stored packed like B,
  float zero-points (lowbit's default for grouped asymmetric 4-bit: grid = min + s * k) as
  a per-block offset beside the op (``matmul_nbits``), which keeps ORT on its fast path.
  Groups are blocks (``block_size`` = group size, a power of 2 >= 16); a per-channel or
  per-tensor scale is repeated in every block of its row, which is exact;
- W8A8 (int8 weights per channel, int8 activations) -> ``MatMulInteger`` (ONNX, int8 x int8
  -> int32) on activation codes computed in the graph exactly as lowbit's
  ``kernels.int8_dynamic`` does: per token ``s = max(max|x|, 1e-12) / 127``, ``q =
  round(x / s)`` (half to even, as ONNX ``Round``), or a calibrated per-tensor ``s`` with
  ``q`` clipped to [-127, 127]; then ``y = float(sum q_x q_w) * s * s_w``. With
  ``activations="ort-dynamic"`` the dynamic layers use ONNX ``DynamicQuantizeLinear``
  instead (ORT fuses it with MatMulInteger into its DynamicQuantizeMatMul kernel): one uint8
  asymmetric scale for the whole input tensor, not lowbit's per-token int8 scale, so a
  prompt's tokens share one scale and the logits move away from lowbit's (the tests bound
  by how much);
- a Hadamard-rotated layer (``spec.rotation``) -> an explicit ``MatMul`` by its
  ``[K, K]`` Hadamard matrix (``formats.rotation.hadamard_matrix``) before the above.
Anything else (NF4, codebooks, FP8, 3/5/6-bit codes, outlier columns, asymmetric static
activations) is refused with ``UnsupportedSchemeError`` naming the
nearest recipe that exports.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import nn

from lowbit.export.gguf_weights import ExportError, UnsupportedSchemeError
from lowbit.formats.rotation import hadamard_matrix
from lowbit.nn import QuantizedLinear

#: bit widths ORT's CPU MatMulNBits runs (3 and 5 are refused by ORT 1.31+)
NBITS = (2, 4, 8)
ACTIVATIONS = ("per-token", "ort-dynamic")
_TINY = 1e-12  # lowbit's floor for an all-zero token's scale (kernels.int8_dynamic)


class Graph:
    """Nodes and initializers of one ONNX graph, with unique names."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list = []
        self.initializers: list = []
        self.ops: Counter = Counter()
        self._used: Counter = Counter()
        self._consts: dict = {}

    def name(self, stem: str) -> str:
        self._used[stem] += 1
        n = self._used[stem]
        return stem if n == 1 else f"{stem}_{n}"

    def init(self, stem: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        array = np.asarray(values, dtype=dtype)
        key = (array.tobytes(), array.dtype.str, array.shape)
        if key not in self._consts:
            self._consts[key] = self.init("const", array)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, outputs: int = 1, out: str | None = None,
           domain: str = "", **attrs):
        """Add a node; returns its output name (or names when ``outputs > 1``)."""
        stem = self.name(f"{op_type}")
        names = [out] if out is not None else [f"{stem}_out{i}" for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), names, name=stem,
                                                domain=domain or None, **attrs))
        self.ops[f"{domain}.{op_type}" if domain else op_type] += 1
        return names[0] if outputs == 1 else names


def nearest_recipe(module: QuantizedLinear) -> str:
    """The preset closest to ``module``'s scheme whose layers export to ONNX."""
    if module.activation is not None:
        return "w8a8-plain"
    spec = module.spec
    if spec.fmt.bits >= 6 or spec.fmt.kind == "float":
        return "w8"
    group = spec.group_size if spec.group_size in (32, 64, 128) else 32
    return f"w4g{group}"


def refuse(name: str, module: QuantizedLinear, what: str) -> UnsupportedSchemeError:
    recipe = nearest_recipe(module)
    return UnsupportedSchemeError(
        f"{name}: {what}; re-quantize with recipe {recipe!r} (`lowbit quantize MODEL --recipe "
        f"{recipe} -o DIR`) and export that to ONNX")


def _block_size(name: str, module: QuantizedLinear) -> int:
    """MatMulNBits' block: the group, or (one scale per row) the largest power of 2 up to
    256 dividing K (ORT pads a partial last block, so 32 when none does)."""
    gran = module.spec.granularity
    if gran.kind == "group":
        g = gran.group_size
        if g < 16 or g & (g - 1):
            raise refuse(name, module, f"groups of {g} inputs are no MatMulNBits block "
                         "(a power of 2, at least 16)")
        return g
    k = module.in_features
    return next((b for b in (256, 128, 64, 32, 16) if k % b == 0), 32)


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits along the last axis, ``8 // bits`` to a byte, low bits first."""
    per = 8 // bits
    u = u.reshape(*u.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(u.shape[:-1], dtype=np.uint8)
    for j in range(per):
        out |= u[..., j] << (bits * j)
    return out


def _blocks(values: torch.Tensor, rows: int, blocks: int) -> np.ndarray:
    """Per-group / per-channel / per-tensor parameters as ``[rows, blocks]`` float32."""
    v = values.detach().float().reshape(rows, -1) if values.numel() > 1 \
        else values.detach().float().reshape(1, 1).expand(rows, 1)
    if v.shape[1] == 1:
        v = v.expand(rows, blocks)
    return v.contiguous().numpy()


def accuracy_for(bits: int, accuracy_level: int | None) -> int:
    """MatMulNBits' ``accuracy_level`` for a ``bits``-wide layer: the one asked, else (None)
    0 (float32 products, lowbit's numbers) for 2 and 4 bits and 4 (int8 activations per
    block) for 8 bits: ORT's CPU kernel has no fast float path for 8-bit codes (measured
    50x slower than a float32 MatMul for 1 x 576 x 49152 in ORT 1.32)."""
    if accuracy_level is not None:
        return accuracy_level
    return 4 if bits == 8 else 0


def _block_sums(g: Graph, x: str, K: int, bs: int) -> str:
    """``[b, s, ceil(K/bs)]`` sums of ``x`` ``[b, s, K]`` over each block (shared by the
    layers that read ``x``)."""
    key = ("block_sums", x, bs)
    if key not in g._consts:
        kb = -(-K // bs)
        if kb * bs != K:
            x = g.op("Pad", x, g.const([0, 0, 0, 0, 0, kb * bs - K]))
        blocks = g.op("Reshape", x, g.const([0, 0, kb, bs]))
        g._consts[key] = g.op("ReduceSum", blocks, g.const([-1]), keepdims=0)
    return g._consts[key]


def matmul_nbits(g: Graph, x: str, name: str, module: QuantizedLinear,
                 accuracy_level: int | None) -> str:
    """``com.microsoft.MatMulNBits`` holding ``module``'s codes, scales and zero-points.

    Float zero-points are not given to the op: ORT's CPU kernel runs them through a slow
    dequantize-every-call path (20-60x a float MatMul in ORT 1.32) and refuses them for 8
    bits. Instead ``(q - z) * s = (q - c) * s + (c - z) * s`` with ``c = 2^(bits-1)``, the
    op's default zero-point: the op runs its fast path without a zero-point and
    ``m = (c - z) * s`` (one float per block) adds ``sum_blocks (sum_block x) * m`` through
    a ``[k_blocks, N]`` MatMul on the block sums of ``x`` (llama.cpp's Q4_1 ``d * q + m``).
    """
    spec = module.spec
    fmt, bits = spec.fmt, spec.fmt.bits
    N, K = module.out_features, module.in_features
    bs = _block_size(name, module)
    kb = -(-K // bs)
    packed = module.packed_weight()
    shift = -fmt.min_value if fmt.min_value < 0 else 0  # signed -> unsigned codes
    codes = packed.codes().to(torch.int16) + shift
    u = np.zeros((N, kb * bs), dtype=np.uint8)  # ORT ignores the codes past K
    u[:, :K] = codes.numpy()
    B = _pack(u, bits).reshape(N, kb, bs * bits // 8)
    qp = packed.qparams
    scale = _blocks(qp.scale, N, kb)
    inputs = [x, g.init(f"{name}.qweight", B), g.init(f"{name}.scales", scale)]
    offset = None
    if not spec.symmetric:
        zero = _blocks(qp.zero_point, N, kb).astype(np.float64) + shift
        if not qp.zero_point.is_floating_point():
            zp = np.zeros((N, -(-kb // (8 // bits)) * (8 // bits)), dtype=np.uint8)
            zp[:, :kb] = np.rint(zero)
            inputs.append(g.init(f"{name}.qzeros", _pack(zp, bits).reshape(-1)))
        else:
            m = ((1 << (bits - 1)) - zero) * scale  # [N, kb]
            offset = g.init(f"{name}.block_offsets", m.T.astype(np.float32))
    y = g.op("MatMulNBits", *inputs, domain="com.microsoft", K=K, N=N, bits=bits,
             block_size=bs, accuracy_level=accuracy_for(bits, accuracy_level))
    if offset is not None:
        y = g.op("Add", y, g.op("MatMul", _block_sums(g, x, K, bs), offset))
    return y


def matmul_int8(g: Graph, x: str, name: str, module: QuantizedLinear, activations: str) -> str:
    """W8A8: int8 activation codes (per token, or one calibrated scale) x int8 weights."""
    spec, act = module.spec, module.activation
    if not (spec.fmt.name == "int8" and spec.symmetric and spec.granularity.kind == "channel"):
        raise refuse(name, module, f"{spec.fmt.name} {spec.granularity} weights with int8 "
                     "activations (lowbit's W8A8 layers have int8 per-channel weights)")
    packed = module.packed_weight()
    wq = g.init(f"{name}.qweight", packed.codes().to(torch.int8).numpy().T)
    w_scale = g.init(f"{name}.scale", packed.qparams.scale.detach().float().reshape(-1).numpy())
    if act.mode == "dynamic" and activations == "ort-dynamic":
        q, s, zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", q, wq, zp)
    else:
        if act.mode == "dynamic":
            amax = g.op("ReduceMax", g.op("Abs", x), axes=[-1], keepdims=1)
            s = g.op("Div", g.op("Max", amax, g.const(_TINY, np.float32)),
                     g.const(127.0, np.float32))
        else:
            qp = module.input_qparams
            if not act.symmetric or qp.zero_point is not None:
                raise refuse(name, module, "asymmetric static int8 activations")
            s = g.const(float(qp.scale.detach().float().reshape(-1)[0]), np.float32)
        q = g.op("Clip", g.op("Round", g.op("Div", x, s)), g.const(-127.0, np.float32),
                 g.const(127.0, np.float32))
        acc = g.op("MatMulInteger", g.op("Cast", q, to=3), wq)  # 3: INT8
    y = g.op("Cast", acc, to=1)  # 1: FLOAT
    return g.op("Mul", y, g.op("Mul", s, w_scale))


def linear(g: Graph, x: str, name: str, module: nn.Module, *,
           accuracy_level: int | None = None,
           activations: str = "per-token") -> str:
    """``module(x)`` as nodes; refuses what ONNX Runtime cannot run exactly."""
    if type(module) is nn.Linear:
        w = module.weight.detach().float().numpy().T
        y = g.op("MatMul", x, g.init(f"{name}.weight", w))
        bias = module.bias
    elif isinstance(module, QuantizedLinear):
        y = quantized(g, x, name, module, accuracy_level, activations)
        bias = module.bias
    else:
        raise ExportError(f"{name}: {type(module).__name__} is not exported to ONNX (lowbit "
                          "exports nn.Linear and QuantizedLinear layers)")
    if bias is not None:
        y = g.op("Add", y, g.init(f"{name}.bias", bias.detach().float().numpy()))
    return y


def quantized(g: Graph, x: str, name: str, module: QuantizedLinear, accuracy_level: int | None,
              activations: str) -> str:
    spec = module.spec
    fmt = spec.fmt
    if module.outlier_index is not None:
        raise refuse(name, module, "float outlier columns beside the int8 weight")
    if fmt.kind != "int" or fmt.bits not in NBITS:
        raise refuse(name, module, f"{fmt.name} codes have no ONNX Runtime kernel "
                     "(MatMulNBits runs 2-, 4- and 8-bit integer codes)")
    if spec.rotation is not None:
        if spec.rotation != "hadamard":
            raise refuse(name, module, f"a {spec.rotation} input rotation")
        k = module.in_features
        h = g._consts.get(("hadamard", k))
        if h is None:
            h = g._consts[("hadamard", k)] = g.init(f"hadamard_{k}",
                                                    hadamard_matrix(k).numpy())
        x = g.op("MatMul", x, h)
    if module.activation is not None:
        return matmul_int8(g, x, name, module, activations)
    return matmul_nbits(g, x, name, module, accuracy_level)
