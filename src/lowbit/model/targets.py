"""Which modules a recipe quantizes, with which scheme, and the model edits around them:
finding the targets (with clear errors), dropping rotations a width cannot take, swapping a
module in, casting what stays in floating point."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import replace

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import has_hadamard
from lowbit.model.gguf_grids import fit_row_length, grid_of
from lowbit.model.recipe import Recipe, RecipeError, Scheme, match_pattern
from lowbit.model.summary import QuantizeSummary
from lowbit.nn import QuantizedConv2d, QuantizedLinear

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the unquantized parts run in: the recipe's, or for ``"auto"`` the one whose
    decode step measured fastest here (``lowbit.kernels.autotune``, ``compute``)."""
    if recipe.compute_dtype == "auto":
        import lowbit.runtime  # noqa: F401  (registers the step probe "compute" depends on)
        from lowbit.kernels import autotune

        return autotune.float_dtype("compute")
    return DTYPES[recipe.compute_dtype]


def find_targets(model: nn.Module, recipe: Recipe, *, check_finite: bool = True
                 ) -> list[tuple[str, nn.Linear, Scheme | None]]:
    """Every ``nn.Linear`` with the scheme it gets; errors when a rule matches nothing.
    ``check_finite=False`` leaves the NaN/Inf check of the weights to the caller (a model
    on the ``meta`` device has no values yet: ``check_finite_weights`` per part)."""
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if not linears:
        raise RecipeError(
            f"{type(model).__name__} has no nn.Linear layers, so there is nothing to quantize "
            f"(lowbit quantizes Linear layers; convolutions and embeddings are not supported yet)"
        )
    names = [n for n, _ in linears]
    for pattern in [r.pattern for r in recipe.rules if not r.optional] + list(recipe.keep):
        if not any(match_pattern(pattern, n) for n in names):
            close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=5, cutoff=0.3)
            raise RecipeError(
                f"recipe pattern {pattern!r} matches no Linear layer; near matches: "
                f"{', '.join(close) or 'none'} (patterns are globs, '*' spans dots, or re:...)"
            )
    targets = [(n, m, recipe.scheme_for(n)) for n, m in linears]
    if check_finite:
        check_finite_weights(targets)
    return targets


class WeightError(LowbitError, ValueError):
    """A weight lowbit cannot quantize (NaN or Inf values); the message names the layer."""


def check_finite_weights(targets: list) -> None:
    """Refuse NaN / Inf weights up front: min/max scales of such a row would be NaN."""
    for name, m, scheme in targets:
        if scheme is None or scheme.weight is None:
            continue
        bad = ~torch.isfinite(m.weight.detach())
        if bad.any():
            row, col = bad.nonzero()[0].tolist()
            raise WeightError(
                f"{name}.weight has {int(bad.sum())} NaN/Inf values (first at [{row}, {col}]: "
                f"{m.weight[row, col].item()}), so its scales would be NaN; repair the model "
                f"(e.g. it overflowed in fp16) or leave the layer unquantized with "
                f"keep=[{name!r}] (CLI: --keep {name})")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def split_outliers(weight: torch.Tensor, channel_absmax: torch.Tensor, k: int):
    """The ``k`` input channels with the largest calibration activations (LLM.int8(),
    Dettmers et al., 2022, sec. 3.2): their weight columns are kept in floating point and
    zeroed in the weight that gets quantized."""
    k = min(k, weight.shape[1])
    index = torch.topk(channel_absmax.float(), k).indices.sort().values
    columns = weight.detach()[:, index].clone()
    rest = weight.detach().clone()
    rest[:, index] = 0
    return rest, (index, columns)


def drop_missing_rotations(targets: list, summary: QuantizeSummary | None = None) -> list:
    """``targets`` with each scheme fitted to its layer's width (``scheme_for_width``): the
    rotation dropped where the width has no Hadamard matrix (``formats.rotation``; quantized
    unrotated, with a warning), and a llama.cpp k-quant grid replaced by llama.cpp's fallback
    type where the width is not a multiple of 256 (``gguf_grids``); the summary lists both.
    Decided once, before calibration, so every later step reads the scheme alone."""
    out = []
    for name, module, scheme in targets:
        width = module.weight.shape[1]
        fitted = scheme_for_width(scheme, width)
        if fitted is not scheme:
            if fitted.weight.rotation != scheme.weight.rotation:
                if summary is not None:
                    summary.unrotated.append(name)
                warnings.warn(f"{name}: no Hadamard rotation of size {width} (lowbit builds "
                              f"12^a * 2^k); this layer is quantized without rotation",
                              stacklevel=3)
            if fitted.weight.scale_dtype != scheme.weight.scale_dtype and summary is not None:
                summary.fallback.append(f"{name} ({width} inputs): {grid_of(fitted.weight)}")
        out.append((name, module, fitted))
    return out


def scheme_for_width(scheme: Scheme | None, width: int) -> Scheme | None:
    """``scheme`` for a layer of ``width`` inputs: without its rotation when ``width`` has no
    Hadamard matrix, on llama.cpp's fallback grid when it is a k-quant's and ``width`` is not
    a multiple of 256 (``gguf_grids.fit_row_length``); ``scheme`` itself when both fit."""
    weight = None if scheme is None else scheme.weight
    if weight is None:
        return scheme
    fitted = fit_row_length(weight, width)
    if fitted.rotation is not None and not has_hadamard(width):
        fitted = replace(fitted, rotation=None)
    return scheme if fitted is weight else replace(scheme, weight=fitted)


def tied_embedding(model: nn.Module) -> nn.Module | None:
    """The input embedding when ``model`` ties it to an ``lm_head`` of its shape, else None."""
    head = getattr(model, "lm_head", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if (isinstance(head, (nn.Linear, QuantizedLinear)) and embed is not None
            and getattr(getattr(model, "config", None), "tie_word_embeddings", False)
            and embed.weight.shape == (head.out_features, head.in_features)):
        return embed
    return None


def tie_embedding_to_head(model: nn.Module) -> bool:
    """Where ``model`` ties its embedding to its head and the head is quantized, make the
    embedding the dequantized head (as llama.cpp stores one tensor for both); True if so.
    ``gguf:`` recipes do this, so lowbit's model is the one a GGUF export holds."""
    head = getattr(model, "lm_head", None)
    embed = tied_embedding(model)
    if not isinstance(head, QuantizedLinear) or embed is None:
        return False
    embed.weight.data = head.dequantize_weight(torch.float32)
    return True


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter and buffer outside ``QuantizedLinear`` modules."""
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedConv2d)):
            continue
        for p in module._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # in place, so tied weights stay tied
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                # rotary inverse frequencies stay float32 (HF computes RoPE in float32)
                if "inv_freq" not in key:
                    module._buffers[key] = b.to(dtype)
