"""``quantize(model, recipe, calibration)``: replace a model's linears, in place, layer by layer.

Flow: find the ``nn.Linear`` modules and the scheme each gets (``Recipe.scheme_for``) →
collect calibration statistics where a scheme needs them (static activation ranges) →
for each layer: choose quantized values (an algorithm of layer 4; RTN by default), pack
them into a ``QuantizedLinear`` and drop the float weight → cast what is left (norms,
embedding, attention) to the recipe's compute dtype.
"""

from __future__ import annotations

import difflib
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import (
    compute_qparams,
    get_format,
    has_hadamard,
    minmax,
    qparams_from_range,
    quantize,
    rotate,
)
from lowbit.kernels.cpu import cpu_features
from lowbit.model.calibration import collect_input_ranges
from lowbit.model.recipe import Recipe, RecipeError, Scheme, match_pattern
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


@dataclass
class QuantizeSummary:
    """What ``quantize`` did: bytes before/after, time, and which kernels run."""

    recipe: str
    layers: int = 0
    kept: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    kernels: dict[str, int] = field(default_factory=dict)
    unrotated: list[str] = field(default_factory=list)  # rotation asked, no Hadamard of size
    cpu: str = field(default_factory=lambda: cpu_features().describe())

    def lines(self) -> list[str]:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 0
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels.items()))
        return [
            f"recipe        {self.recipe}",
            f"layers        {self.layers} quantized, {len(self.kept)} kept as they were",
            f"linear bytes  {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
            f"({ratio:.3f}x)",
            f"kernels       {kernels or 'none (cast only)'}",
            f"cpu           {self.cpu}",
            f"time          {self.seconds:.1f} s",
        ] + ([f"rotation      {len(self.unrotated)} layers without a Hadamard of their size "
              f"stayed unrotated: {', '.join(self.unrotated[:4])}"] if self.unrotated else []
             ) + _native_note()


def _native_note() -> list[str]:
    """A line saying lowbit's native kernels were unavailable and why (a failed build)."""
    from lowbit.kernels import native

    why = native.build_failure()
    return [f"native        unavailable, torch's kernels ran instead: {why}; install gcc or "
            f"set CC"] if why else []


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def find_targets(model: nn.Module, recipe: Recipe) -> list[tuple[str, nn.Linear, Scheme | None]]:
    """Every ``nn.Linear`` with the scheme it gets; errors when a rule matches nothing."""
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
    _check_finite(targets)
    return targets


class WeightError(LowbitError, ValueError):
    """A weight lowbit cannot quantize (NaN or Inf values); the message names the layer."""


def _check_finite(targets: list) -> None:
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


#: row-local granularities (per channel, per group) are quantized this many rows at a time,
#: so the temporaries of a large layer (SmolLM2's 49152 x 576 head: 113 MB per float copy)
#: stay small; the codes and parameters are the same as in one piece
CHUNK_ROWS = 4096


def quantize_weight(weight: torch.Tensor, scheme: Scheme):
    """Codes and parameters for one weight under ``scheme`` (round to nearest); of ``W @ H``
    when the scheme rotates the layer's input (``formats.rotation``)."""
    gran = scheme.weight.granularity
    row_local = weight.dim() == 2 and (gran.kind == "group" or (gran.kind == "channel"
                                                                and gran.axis == 0))
    if row_local and weight.shape[0] > CHUNK_ROWS:
        parts = [_quantize_rows(weight[i:i + CHUNK_ROWS], scheme)
                 for i in range(0, weight.shape[0], CHUNK_ROWS)]
        first = parts[0][1]
        zero = None if first.zero_point is None else torch.cat([q.zero_point for _, q in parts])
        return torch.cat([c for c, _ in parts]), replace(
            first, scale=torch.cat([q.scale for _, q in parts]), zero_point=zero)
    return _quantize_rows(weight, scheme)


def _quantize_rows(weight: torch.Tensor, scheme: Scheme):
    spec = scheme.weight
    w = weight.detach().float()
    if spec.rotation is not None:
        w = rotate(w.double(), spec.rotation).float()
    if scheme.observer == "mse":
        return _mse_clipped(w, spec)
    qparams = compute_qparams(w, spec.format, spec.granularity, symmetric=spec.symmetric,
                              scale_dtype=spec.scale_dtype,
                              integer_zero_point=spec.integer_zero_point)
    return quantize(w, qparams), qparams


def _mse_clipped(w: torch.Tensor, spec, ratios: Iterable[float] = None):
    """Per-parameter clipping ratio that minimises the weight's quantization MSE."""
    from lowbit.formats import dequantize

    gran = spec.granularity
    lo, hi = minmax(w, gran)
    best_err, best = None, None
    for r in ratios or [1.0 - 0.025 * i for i in range(13)]:
        qp = qparams_from_range(lo * r, hi * r, spec.format, gran, symmetric=spec.symmetric,
                                scale_dtype=spec.scale_dtype,
                                integer_zero_point=spec.integer_zero_point)
        codes = quantize(w, qp)
        err = (gran.rows(dequantize(codes, qp) - w) ** 2).sum(-1).reshape(qp.scale.shape)
        if best is None:
            best_err, best = err, (codes, qp)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        mask = gran.expand(better, w.shape)
        best[0].copy_(torch.where(mask, codes, best[0]))
        best[1].scale.copy_(torch.where(better, qp.scale, best[1].scale))
        if qp.zero_point is not None:
            best[1].zero_point.copy_(torch.where(better, qp.zero_point, best[1].zero_point))
    return best


def quantize_model(
    model: nn.Module,
    recipe: Recipe | str,
    calibration: Iterable | None = None,
    *,
    progress: bool = True,
    backend: str | None = None,
) -> QuantizeSummary:
    """Quantize ``model`` in place with ``recipe``; returns a summary (also on the model)."""
    recipe = Recipe.parse(recipe)
    from lowbit.model.calibrated import quantize_calibrated, routes_here

    if routes_here(recipe):  # GPTQ, AWQ, SmoothQuant, HQQ, k-means, imatrix, auto:<bpw>
        return quantize_calibrated(model, recipe, calibration, progress=progress,
                                   backend=backend)
    t0 = time.perf_counter()
    summary = QuantizeSummary(recipe.name)
    targets = drop_missing_rotations(find_targets(model, recipe), summary)
    dtype = compute_dtype(recipe)
    if recipe.default is not None and recipe.default.weight is None and not recipe.rules:
        # fp16 / bf16: cast only
        numel = sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel())
                    for _, m, _ in targets)
        summary.bytes_before = numel * 4
        summary.bytes_after = numel * torch.finfo(dtype).bits // 8
        cast_unquantized(model, dtype)
        summary.kernels = {f"F.linear ({_dtype_name(dtype)})": len(targets)}
        summary.layers = len(targets)
        summary.seconds = time.perf_counter() - t0
        model.lowbit_recipe = recipe
        model.lowbit_summary = summary
        return summary
    input_ranges = {}
    if recipe.needs_calibration:
        if calibration is None:
            raise RecipeError(
                f"recipe {recipe.name!r} needs calibration data (static activation ranges); "
                f"pass calibration=lowbit.data.text('default', tokenizer) or --calibration FILE"
            )
        static = [(n, m, s) for n, m, s in targets if s is not None and s.needs_calibration]
        input_ranges = collect_input_ranges(model, static, calibration, progress=progress)
        del static
    # names only from here: a replaced layer's float weight is freed as soon as it is packed
    targets = [(name, scheme) for name, _, scheme in targets]
    bar = _progress(targets, progress)
    for name, scheme in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name[-40:])
        if scheme is None or scheme.weight is None:
            summary.kept.append(name)
            continue
        linear = model.get_submodule(name)
        summary.bytes_before += _tensor_bytes(linear.weight) + _tensor_bytes(linear.bias)
        weight, outliers = linear.weight, None
        if scheme.outlier_channels > 0:
            weight, outliers = split_outliers(weight, input_ranges[name].channel_absmax,
                                              scheme.outlier_channels)
        codes, qparams = quantize_weight(weight, scheme)
        input_qparams = None
        if scheme.activation is not None and scheme.activation.mode == "static":
            stats = input_ranges[name]
            lo, hi = stats.min, stats.max
            if outliers is not None:  # the outlier channels no longer reach the int8 path
                rest = stats.channel_absmax.index_fill(0, outliers[0], 0).max()
                lo, hi = torch.maximum(lo, -rest), torch.minimum(hi, rest)
            input_qparams = qparams_from_range(lo, hi, get_format("int8"), symmetric=True)
        qlinear = QuantizedLinear.from_codes(
            codes, qparams, scheme.weight, linear.bias, activation=scheme.activation,
            input_qparams=input_qparams, backend=backend, outliers=outliers)
        _set_module(model, name, qlinear)
        summary.layers += 1
        summary.bytes_after += qlinear.weight_nbytes() + _tensor_bytes(qlinear.bias)
        summary.kernels[qlinear.kernel] = summary.kernels.get(qlinear.kernel, 0) + 1
    cast_unquantized(model, dtype)
    summary.seconds = time.perf_counter() - t0
    model.lowbit_recipe = recipe
    model.lowbit_summary = summary
    return summary


def drop_missing_rotations(targets: list, summary: QuantizeSummary | None = None) -> list:
    """``targets`` with the rotation dropped from the scheme of every layer whose input size
    has no Hadamard matrix (``formats.rotation``): it is quantized unrotated, with a warning,
    and the summary lists it. Decided once, before calibration, so every later step (ranges,
    searches, quantization) reads the scheme alone."""
    out = []
    for name, module, scheme in targets:
        width = module.weight.shape[1]
        fitted = scheme_for_width(scheme, width)
        if fitted is not scheme:
            if summary is not None:
                summary.unrotated.append(name)
            warnings.warn(f"{name}: no Hadamard rotation of size {width} (lowbit builds "
                          f"12^a * 2^k); this layer is quantized without rotation", stacklevel=3)
        out.append((name, module, fitted))
    return out


def scheme_for_width(scheme: Scheme | None, width: int) -> Scheme | None:
    """``scheme`` without its rotation when ``width`` inputs have no Hadamard matrix, else
    ``scheme`` itself."""
    rotation = None if scheme is None or scheme.weight is None else scheme.weight.rotation
    if rotation is None or has_hadamard(width):
        return scheme
    return replace(scheme, weight=replace(scheme.weight, rotation=None))


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


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="quantizing", unit="layer", leave=False, disable=None)
