"""Write a lowbit model as a GPTQ checkpoint (GPTQModel, vLLM, transformers + gptqmodel).

Per quantized linear with K inputs, N outputs, groups of g (GPTQModel's
``PackableQuantLinear.dequantize_weight``; AutoGPTQ's original layout):

- ``qweight`` int32 ``[K * bits / 32, N]``: code k of column n in word ``k // (32/bits)`` at
  bit ``bits * (k % (32/bits))`` (the transposed, input-major orientation);
- ``qzeros`` int32 ``[K / g, N * bits / 32]``: the zero-point of column n packed the same way
  along the outputs;
- ``scales`` float16 ``[K / g, N]``; ``g_idx`` int32 ``[K]`` = k // g (no act-order);
- weight = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]) with unsigned codes.
``checkpoint_format: gptq_v2`` stores z itself (format v1 stores z - 1 and cannot hold
z = 0). A symmetric lowbit layer is written as sym=True with z = 2^(bits-1).
One bits/group/sym scheme per checkpoint: layers quantized otherwise (the int8 head of the
4-bit recipes) are written as their dequantized float weights, and the report says so.
Refused: float zero-points (use the ``-izp`` recipe), rotations, activation quantization,
bit widths other than 4 and 8.
"""

from __future__ import annotations

import collections
import json
import os

import torch

from lowbit.export import hf_checkpoint as folder
from lowbit.export.gguf_weights import ExportError
from lowbit.export.to_compressed_tensors import check_layout, check_zero_point, refuse
from lowbit.nn import QuantizedLinear

FORMAT = "GPTQ"
BITS = (4, 8)


def scheme_of(name: str, module: QuantizedLinear) -> tuple[int, int, bool]:
    """(bits, group_size or -1, sym) of a layer a GPTQ checkpoint can hold, or a refusal."""
    check_layout(name, module, FORMAT)
    spec = module.spec
    fmt, gran = spec.fmt, spec.granularity
    if module.activation is not None:
        raise refuse(name, module, "GPTQ checkpoints are weight-only; int8 activation "
                     "quantization has no place there (compressed-tensors holds W8A8)", FORMAT)
    if fmt.kind != "int" or fmt.bits not in BITS:
        raise refuse(name, module, f"{fmt.name} weights have no GPTQ layout (4- or 8-bit "
                     "integers)", FORMAT)
    check_zero_point(name, module, FORMAT)
    if gran.kind not in ("group", "channel"):
        raise refuse(name, module, f"{gran} scales have no GPTQ layout", FORMAT)
    pack = 32 // fmt.bits
    if module.in_features % pack or module.out_features % pack:
        raise refuse(name, module, f"a {module.out_features}x{module.in_features} weight does "
                     f"not pack {pack} codes per int32 word in both directions", FORMAT)
    return fmt.bits, gran.group_size if gran.kind == "group" else -1, spec.symmetric


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``values`` ``[R, C]`` along dim 0: ``R * bits / 32`` words, value r in
    word ``r // (32/bits)`` at bit ``bits * (r % (32/bits))``."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0] // per, per, *values.shape[1:])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, *[1] * (v.dim() - 2))
    words = (v << shifts).sum(dim=1)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # the same 32 bits, signed


def layer_tensors(module: QuantizedLinear, bits: int, group: int) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales / g_idx (and bias) of one layer, from lowbit's own codes."""
    spec = module.spec
    packed = module.packed_weight()
    qp = packed.qparams
    rows, cols = module.out_features, module.in_features
    shift = 1 << (bits - 1) if spec.fmt.min_value < 0 else 0  # signed -> unsigned codes
    codes = packed.codes().to(torch.int16) + shift  # [N, K]
    scale = qp.scale.detach().float().reshape(rows, -1)  # [N, G]
    if spec.symmetric:
        zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.int16)
    else:
        zero = qp.zero_point.detach().to(torch.int16).reshape(rows, -1) + shift
    g = group if group > 0 else cols
    out = {"qweight": pack_int32(codes.t().contiguous(), bits),
           "qzeros": pack_int32(zero, bits).t().contiguous(),
           "scales": scale.t().contiguous().to(torch.float16),
           "g_idx": (torch.arange(cols) // g).to(torch.int32)}
    if module.bias is not None:
        out["bias"] = module.bias.detach().to(torch.float16)
    return out


def quantize_config(bits: int, group: int, sym: bool) -> dict:
    from lowbit.version import __version__

    return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False,
            "sym": sym, "checkpoint_format": "gptq_v2", "lm_head": False,
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
            "pack_dtype": "int32", "meta": {"quantizer": [f"lowbit:{__version__}"]}}


def export_gptq(model, path: str | os.PathLike, *, overwrite: bool = False,
                dtype: str = "fp16", tokenizer=None) -> folder.FolderReport:
    """Write ``model`` (``nn.Module``, lowbit checkpoint folder, bundled name...) as a GPTQ
    ``gptq_v2`` folder; ``dtype``: float dtype of the unquantized tensors (scales are
    float16, as the format has them)."""
    torch_dtype = folder.check_dtype(dtype)
    target = folder.check_target(path, overwrite)
    model, tokenizer = folder.open_model(model, tokenizer)
    layers = folder.quantized_layers(model)
    schemes = {name: scheme_of(name, m) for name, m in layers.items()}
    if not schemes:
        raise ExportError("the model has no layer quantized by lowbit; quantize it first "
                          "(`lowbit quantize MODEL --recipe w4g128-gptq-izp -o DIR`)")
    counts = collections.Counter(schemes.values())
    (bits, group, sym), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0][0] < 8))
    tensors, notes, rounding, dequantized = {}, [], 0.0, []
    for name, module in layers.items():
        if schemes[name] != (bits, group, sym):
            tensors[f"{name}.weight"] = module.dequantize_weight(torch.float32).to(torch_dtype)
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().to(torch_dtype)
            dequantized.append(name)
            continue
        rounding = max(rounding, folder.scale_rounding(module.packed_weight().qparams.scale,
                                                       torch.float16))
        tensors |= {f"{name}.{k}": v for k, v in layer_tensors(module, bits, group).items()}
    tensors |= folder.float_tensors(model, set(layers), torch_dtype)
    qconfig = quantize_config(bits, group, sym)
    config = folder.config_dict(model, dtype) | {"quantization_config": qconfig}
    if dequantized:
        notes.append(f"{', '.join(dequantized)}: quantized otherwise than the checkpoint's "
                     f"{bits}-bit scheme, written as dequantized {dtype} weights")
    if rounding:
        notes.append(f"scales rounded to float16: largest relative change {rounding:.2g}")

    def finish(tmp):
        (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))

    size = folder.write_folder(target, overwrite, tensors, config, tokenizer, finish)
    return folder.FolderReport(target, f"GPTQ {bits}-bit g{group} gptq_v2", dtype, size,
                               (target / folder.WEIGHTS).stat().st_size,
                               len(layers) - len(dequantized), dequantized, notes)
