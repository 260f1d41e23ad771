"""One weight matrix as GGUF data: lowbit's codes moved into blocks, or a float weight rounded.

A quantized layer's codes are carried over unchanged wherever a GGUF block type holds its
grid, with the scale (and offset) of its group repeated in every 32-value block of the group:

- int8 symmetric, per channel or groups of 32k -> ``Q8_0``: d = scale;
- int4 / int5 symmetric -> ``Q4_0`` / ``Q5_0``: stored code = code + 8 / + 16, d = scale;
- uint4 / uint5 asymmetric (float or integer zero-point) -> ``Q4_1`` / ``Q5_1``: lowbit
  computes x = (q - z) * s, the block x = d * q + m, so d = s and m = -z * s;
- the ``iq4nl`` lookup table, symmetric (``gguf:iq4_nl``) -> ``IQ4_NL``: code = index into
  the same table, d = scale.
d and m are stored as float16: the only rounding the move adds (``ExportReport`` measures it).
Codes solved on a k-quant grid (``model/gguf_grids.py``: groups inside 256-input super-blocks
with ``fp16*...`` scale dtypes) become Q6_K, Q5_K, Q4_K, Q3_K or Q2_K blocks
(``gguf_kquants``) whose ``d * sc`` are lowbit's scales exactly.
Everything else (rotations, activation quantization, NF4, codebooks, FP8, 2/3-bit, groups
that are not a multiple of 32) has no GGUF block type: ``UnsupportedSchemeError`` names the
nearest recipe that exports.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowbit.algorithms.round_to_nearest import quantize_weight
from lowbit.errors import LowbitError
from lowbit.export import gguf_blocks as blocks
from lowbit.export import gguf_kquants as kquants
from lowbit.formats import FormatError, get_format
from lowbit.formats.superblock import QK_K, super_scale
from lowbit.model.gguf_grids import fit_row_length, grid_of, grid_spec
from lowbit.nn import QuantizedLinear, WeightSpec

#: (format, symmetric) -> GGUF block type holding that grid exactly
CARRIED = {("int8", True): "q8_0", ("int4", True): "q4_0", ("int5", True): "q5_0",
           ("uint4", False): "q4_1", ("uint5", False): "q5_1", ("iq4nl", True): "iq4_nl"}
BLOCK_TYPE_HELP = ("GGUF holds int8 symmetric (Q8_0), int4/int5 symmetric (Q4_0/Q5_0), "
                   "4/5-bit asymmetric (Q4_1/Q5_1) and llama.cpp's iq4nl table (IQ4_NL) codes "
                   "in blocks of 32 inputs, and the k-quants' grids of the "
                   "gguf:q6_k/q5_k/q4_k/q3_k/q2_k recipes")


class ExportError(LowbitError, ValueError):
    """A model that cannot be exported as asked; the message names the fix."""


class TokenizerExportError(ExportError):
    """A tokenizer that lowbit cannot describe in GGUF metadata."""


class UnsupportedSchemeError(ExportError):
    """A layer's quantization scheme has no GGUF block type."""


def nearest_recipe(spec: WeightSpec, activation=None) -> str:
    """The preset closest to ``spec`` whose weights export exactly."""
    fmt = get_format(spec.format)
    if fmt.bits >= 6:
        return "w8"
    group = spec.group_size
    return f"w4g{group}" if group in (64, 128) else "w4g32"


def _refuse(layer: str, what: str, spec: WeightSpec, activation=None) -> UnsupportedSchemeError:
    recipe = nearest_recipe(spec, activation)
    return UnsupportedSchemeError(
        f"{layer}: {what} has no GGUF block type ({BLOCK_TYPE_HELP}); re-quantize with recipe "
        f"{recipe!r} (`lowbit quantize MODEL --recipe {recipe} -o DIR`) and export that")


def check_row_length(layer: str, cols: int) -> None:
    if cols % blocks.BLOCK:
        raise ExportError(
            f"{layer}: rows of {cols} values are not a multiple of {blocks.BLOCK}, the GGUF "
            f"block size; keep this layer unquantized (recipe keep=[...]) and export float "
            f"weights with --type f16 or f32")


def block_type_of(layer: str, module: QuantizedLinear) -> str:
    """The GGUF type that carries ``module``'s codes, or ``UnsupportedSchemeError``."""
    spec = module.spec
    if spec.rotation is not None:
        raise _refuse(layer, f"an online {spec.rotation} input rotation", spec,
                      module.activation)
    if module.activation is not None:
        raise _refuse(layer, f"{module.activation.mode} int8 activation quantization "
                      "(llama.cpp chooses its own activation rounding)", spec, module.activation)
    if module.outlier_index is not None:
        raise _refuse(layer, "float outlier columns", spec)
    kquant = kquants.kquant_of(spec)
    if kquant is not None:
        if module.in_features % QK_K:
            raise ExportError(f"{layer}: rows of {module.in_features} values do not fill "
                              f"{kquant.upper()}'s super-blocks of {QK_K}; quantize with a "
                              f"gguf:{kquant} recipe, which gives such layers llama.cpp's "
                              f"fallback type")
        return kquant
    if super_scale(spec.scale_dtype) is not None:
        raise _refuse(layer, f"{spec.format} groups of {spec.group_size} with "
                      f"{spec.scale_dtype} scales", spec)
    name = CARRIED.get((spec.format, spec.symmetric))
    if name is None:
        what = f"{'symmetric' if spec.symmetric else 'asymmetric'} {spec.format} weights"
        raise _refuse(layer, what, spec)
    gran = spec.granularity
    if gran.kind == "group" and gran.group_size % blocks.BLOCK:
        raise _refuse(layer, f"groups of {gran.group_size}", spec)
    if gran.kind not in ("group", "channel", "tensor"):
        raise _refuse(layer, f"{gran} granularity", spec)
    check_row_length(layer, module.in_features)
    return name


def _per_block(param: torch.Tensor, rows: int, cols: int, group: int) -> np.ndarray:
    """``param`` (one value per row, per group of ``group`` or per tensor) for every block."""
    p = param.detach().float().reshape(rows if param.numel() > 1 else 1, -1)
    index = torch.arange(cols // blocks.BLOCK) * blocks.BLOCK // group
    p = p[:, index.clamp_max(p.shape[1] - 1)]
    return p.expand(rows, -1).contiguous().numpy()


def carry_codes(layer: str, module: QuantizedLinear) -> tuple[str, np.ndarray]:
    """(type, uint8 blocks ``[out, bytes]``) holding ``module``'s own codes."""
    name = block_type_of(layer, module)
    packed = module.packed_weight()
    rows, cols = packed.out_features, packed.in_features
    if name in kquants.KQUANTS:
        qp = packed.qparams
        try:
            return name, kquants.carry(name, packed.codes(), qp.scale, qp.zero_point)
        except FormatError as exc:
            raise ExportError(f"{layer}: its scales are not on {name.upper()}'s grid ({exc}); "
                              f"quantize with recipe gguf:{name}[-<algorithm>]") from exc
    gran = module.spec.granularity
    group = gran.group_size if gran.kind == "group" else cols
    qp = packed.qparams
    scale = _per_block(qp.scale, rows, cols, group)
    codes = packed.codes()
    if blocks.OFFSET[name]:
        codes = codes.to(torch.int16) + blocks.OFFSET[name]
    m = None
    if blocks.BLOCK_TYPES[name][1]:
        zero = _per_block(qp.zero_point, rows, cols, group) if qp.zero_point is not None \
            else np.zeros_like(scale)
        m = -zero * scale
    d16 = scale.astype(np.float16)
    if not np.isfinite(d16).all() or ((d16 == 0) & (scale != 0)).any():
        raise ExportError(f"{layer}: a scale ({np.abs(scale).max():.3g} .. "
                          f"{np.abs(scale[scale != 0]).min():.3g}) falls outside float16, "
                          "which GGUF blocks store; rescale the layer or export with --type f32")
    return name, blocks.pack(name, codes.numpy(), scale, m)


def float_weight(layer: str, weight: torch.Tensor, type_name: str) -> tuple[str, np.ndarray]:
    """(type, data) of a float weight: as F32 / F16, rounded to a 32-value block type the way
    llama.cpp's reference quantizer rounds it, or to a k-quant by lowbit's round to nearest
    on its grid (llama.cpp's fallback type where rows do not fill its super-blocks)."""
    w = weight.detach().float().numpy()
    if type_name == "f32":
        return "f32", np.ascontiguousarray(w)
    if type_name == "f16":
        return "f16", w.astype(np.float16)
    if type_name == "iq4_nl":  # gguf-py has no IQ4_NL quantizer: lowbit's rounding, its grid
        check_row_length(layer, w.shape[-1])
        codes, qp = quantize_weight(weight.detach().float(), grid_spec(type_name))
        return type_name, blocks.pack(type_name, codes.numpy(), qp.scale.float().numpy())
    if type_name in kquants.KQUANTS:
        spec = fit_row_length(grid_spec(type_name), w.shape[-1])
        if grid_of(spec) == type_name:
            codes, qp = quantize_weight(weight.detach().float(), spec)
            return type_name, kquants.carry(type_name, codes, qp.scale, qp.zero_point)
        type_name = grid_of(spec)
    check_row_length(layer, w.shape[-1])
    return type_name, blocks.pack(type_name, *blocks.round_float(w, type_name))


def lowbit_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight ``module`` applies (dequantized for a quantized layer)."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize_weight(torch.float32)
    return module.weight.detach().float()
