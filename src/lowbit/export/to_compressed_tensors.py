"""Write a lowbit model as a compressed-tensors checkpoint (transformers, vLLM).

The format (``compressed-tensors`` package: ``quantization/quant_config.py``,
``quant_args.py``, ``compressors/``) stores each quantized linear under a scheme of
``config.json`` -> ``quantization_config.config_groups``; a reader dequantizes
``x = (q - z) * s`` with signed codes. lowbit's codes are carried over unchanged:

- int4 / int8 weight-only, groups or channels, symmetric or with an integer zero-point ->
  ``pack-quantized``: ``weight_packed`` (the package's ``pack_to_int32``; unsigned codes
  shifted by 2^(bits-1), zero-points likewise), ``weight_scale``, ``weight_shape``;
- int8 weights with int8 activations (dynamic per token, or one static scale) ->
  ``int-quantized``: ``weight`` int8 + ``weight_scale`` (+ ``input_scale`` when static);
- FP8 E4M3 weights -> ``float-quantized``: ``weight`` float8_e4m3fn + ``weight_scale``.
Scales are stored in the folder's float dtype (bf16 holds lowbit's grouped scales exactly).
Refused, naming the nearest recipe that exports: float zero-points (not representable: the
``-izp`` variant of the recipe has integer ones), Hadamard-rotated layers (the format's
``transform_config`` exists, but transformers' compressed-tensors loader never applies it,
so a rotated layer would run unrotated), outlier columns, NF4 / codebooks / other bit widths.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import torch

from lowbit.export import hf_checkpoint as folder
from lowbit.export.gguf_weights import ExportError, UnsupportedSchemeError
from lowbit.nn import QuantizedLinear

FORMAT = "compressed-tensors"
#: weight bits vLLM's compressed-tensors kernels run (W4A16 / W8A16 / W8A8)
INT_BITS = (4, 8)


def _require():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise ExportError("compressed-tensors export needs the compressed-tensors package: "
                          "pip install 'lowbit[export]'") from exc


def nearest_recipe(module: QuantizedLinear) -> str:
    """The recipe closest to ``module``'s scheme whose layers export."""
    spec = module.spec
    if module.activation is not None:
        return "w8a8-plain"
    if spec.fmt.bits >= 6:
        return "fp8" if spec.fmt.kind == "float" else "w8"
    fits = [g for g in (128, 64, 32) if module.in_features % g == 0] or [32]
    group = spec.group_size if spec.group_size in fits else fits[0]
    algorithm = "" if spec.rotation is None else "-gptq"
    return f"w4g{group}{algorithm}-izp"


def refuse(name: str, module: QuantizedLinear, what: str, fmt: str = FORMAT):
    recipe = nearest_recipe(module)
    return UnsupportedSchemeError(
        f"{name}: {what}; re-quantize with recipe {recipe!r} (`lowbit quantize MODEL --recipe "
        f"{recipe} -o DIR`) and export that to {fmt}")


def check_layout(name: str, module: QuantizedLinear, fmt: str) -> None:
    """Refusals shared with the GPTQ exporter: an input rotation, outlier columns."""
    spec = module.spec
    if spec.rotation is not None:
        raise refuse(name, module, f"an online {spec.rotation} input rotation cannot be "
                     f"described in {fmt} so that transformers applies it (its loader never "
                     "runs a transform_config); the layer would run unrotated", fmt)
    if module.outlier_index is not None:
        raise refuse(name, module, f"float outlier columns have no place in {fmt}", fmt)


def check_zero_point(name: str, module: QuantizedLinear, fmt: str) -> None:
    """Refusals shared with the GPTQ exporter: float zero-points, partial groups."""
    spec = module.spec
    if not spec.symmetric and not spec.integer_zero_point:
        recipe = nearest_recipe(module)
        raise UnsupportedSchemeError(
            f"{name}: float zero-points (lowbit's grouped default: grid = min + scale * k) are "
            f"not representable in {fmt}, whose zero-points are integers; re-quantize with "
            f"the integer-zero-point variant of the recipe (add -izp to its name: recipe "
            f"{recipe!r}, `lowbit quantize MODEL --recipe {recipe} -o DIR`) and export that")
    gran = spec.granularity
    if gran.kind == "group" and module.in_features % gran.group_size:
        raise refuse(name, module, f"{module.in_features} inputs are not a multiple of the "
                     f"group size {gran.group_size}", fmt)


def _args(module: QuantizedLinear) -> dict:
    spec = module.spec
    fmt, gran = spec.fmt, spec.granularity
    args = {"num_bits": fmt.bits, "type": "float" if fmt.kind == "float" else "int",
            "symmetric": spec.symmetric, "strategy": gran.kind, "dynamic": False}
    if gran.kind == "group":
        args["group_size"] = gran.group_size
    return args


def _input_args(name: str, module: QuantizedLinear) -> dict | None:
    act = module.activation
    if act is None:
        return None
    if not act.symmetric:
        raise refuse(name, module, "asymmetric int8 activations are not exported")
    if act.mode == "dynamic":
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                "dynamic": True}
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
            "dynamic": False}


def layer_tensors(name: str, module: QuantizedLinear, dtype: torch.dtype):
    """(format, weights args, input args, local tensors) of one layer, or a refusal."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    check_layout(name, module, FORMAT)
    spec = module.spec
    fmt = spec.fmt
    packed = module.packed_weight()
    qp = packed.qparams
    rows = module.out_features
    scale = qp.scale.detach().float().reshape(rows, -1) if spec.granularity.kind != "tensor" \
        else qp.scale.detach().float().reshape(1)
    tensors = {"weight_scale": scale.to(dtype)}
    inputs = _input_args(name, module)
    if inputs is not None and not inputs["dynamic"]:
        tensors["input_scale"] = module.input_qparams.scale.detach().float().reshape(1).to(dtype)
    if fmt.kind == "float":
        if fmt.name != "fp8_e4m3" or inputs is not None:
            raise refuse(name, module, f"{fmt.name} weights"
                         f"{' with int8 activations' if inputs else ''} are not exported")
        codes = packed.codes().to(torch.uint8).view(torch.float8_e4m3fn)
        return "float-quantized", _args(module), None, {"weight": codes, **tensors}
    if fmt.kind != "int" or fmt.bits not in INT_BITS:
        raise refuse(name, module, f"{fmt.name} weights have no compressed-tensors type that "
                     "vLLM runs (int4 / int8 integers, FP8)")
    check_zero_point(name, module, FORMAT)
    shift = 0 if fmt.min_value < 0 else 1 << (fmt.bits - 1)  # unsigned -> signed codes
    codes = (packed.codes().to(torch.int16) - shift).to(torch.int8)
    zero = None
    if not spec.symmetric:
        zero = (qp.zero_point.detach().to(torch.int16).reshape(scale.shape) - shift)
        zero = zero.to(torch.int8)
    if inputs is not None and fmt.bits == 8 and zero is None:
        return "int-quantized", _args(module), inputs, {"weight": codes, **tensors}
    tensors |= {"weight_packed": pack_to_int32(codes, fmt.bits),
                "weight_shape": torch.tensor([rows, module.in_features], dtype=torch.int64)}
    if zero is not None:
        tensors["weight_zero_point"] = pack_to_int32(zero, fmt.bits, packed_dim=0).contiguous()
    return "pack-quantized", _args(module), inputs, tensors


def compact_targets(names: list[str], all_names: set[str]) -> list[str]:
    """Layer names as config targets: ``re:`` patterns for a projection quantized alike in
    every decoder layer, exact names for the rest (targets match exact names or ``re:``)."""
    by_suffix = defaultdict(set)
    for n in names:
        m = re.fullmatch(r"(.*\.layers)\.(\d+)\.(.+)", n)
        if m:
            by_suffix[(m.group(1), m.group(3))].add(n)
    out, covered = [], set()
    for (stem, suffix), members in sorted(by_suffix.items()):
        pattern = rf"{re.escape(stem)}\.\d+\.{re.escape(suffix)}$"
        if len(members) > 1 and {n for n in all_names if re.fullmatch(pattern, n)} == members:
            out.append(f"re:{pattern}")
            covered |= members
    return out + [n for n in names if n not in covered]


def export_compressed_tensors(model, path: str | os.PathLike, *, overwrite: bool = False,
                              dtype: str = "bf16", tokenizer=None) -> folder.FolderReport:
    """Write ``model`` (``nn.Module``, lowbit checkpoint folder, bundled name...) as a
    compressed-tensors folder that ``AutoModelForCausalLM.from_pretrained`` loads;
    ``dtype``: float dtype of unquantized tensors and scales (bf16, fp16, fp32)."""
    _require()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    torch_dtype = folder.check_dtype(dtype)
    target = folder.check_target(path, overwrite)
    model, tokenizer = folder.open_model(model, tokenizer)
    layers = folder.quantized_layers(model)
    if not layers:
        raise ExportError("the model has no layer quantized by lowbit; quantize it first "
                          "(`lowbit quantize MODEL --recipe w4g128-izp -o DIR`)")
    tensors, groups, rounding = {}, defaultdict(list), 0.0
    for name, module in layers.items():
        fmt, weights, inputs, own = layer_tensors(name, module, torch_dtype)
        key = (fmt, tuple(sorted(weights.items())), tuple(sorted((inputs or {}).items())))
        groups[key].append(name)
        rounding = max(rounding, folder.scale_rounding(module.packed_weight().qparams.scale,
                                                       torch_dtype))
        tensors |= {f"{name}.{k}": v for k, v in own.items()}
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().to(torch_dtype)
    tensors |= folder.float_tensors(model, set(layers), torch_dtype)
    config_groups = {}
    for i, ((fmt, weights, inputs), names) in enumerate(groups.items()):
        config_groups[f"group_{i}"] = {
            "targets": compact_targets(names, set(layers)), "weights": dict(weights),
            "input_activations": dict(inputs) or None, "format": fmt}
    formats = {k[0] for k in groups}
    qconfig = QuantizationConfig.model_validate({
        "config_groups": config_groups, "quantization_status": "compressed",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision"})
    config = folder.config_dict(model, dtype)
    size = folder.write_folder(target, overwrite, tensors, config, tokenizer,
                               finish=ModelCompressor(quantization_config=qconfig).update_config)
    float_linears = [n for n, m in model.named_modules()
                     if type(m) is torch.nn.Linear and n != "lm_head"]
    notes = []
    if rounding:
        notes.append(f"scales rounded to {dtype}: largest relative change {rounding:.2g} "
                     "(export with dtype fp32 to keep them exactly)")
    return folder.FolderReport(target, FORMAT, dtype, size,
                               (target / folder.WEIGHTS).stat().st_size, len(layers),
                               float_linears, notes)
