"""``quantize(model, recipe, calibration)``: the one path from a recipe to packed modules.

1. Parse the recipe; a ``-frot`` recipe first rotates the residual stream and folds the
   rotation into the weights (``fold_rotation.py``); an ``auto:<bpw>`` placeholder is
   resolved into per-layer schemes by measuring sensitivity (``mixed.py``).
2. Find every ``nn.Linear`` and its scheme (``targets.py``); a cast-only recipe (fp16,
   bf16) stops here.
3. Statistics. Where an algorithm reads the inputs of the layers (GPTQ, GPTAQ, AWQ,
   SmoothQuant, imatrix, k-means), the block runner (``runner.py``) walks the model one
   block at a time and hands each group of linears that share an input to
   ``algorithms.group`` with its statistics. Otherwise (round to nearest, HQQ) no block is
   run; static activation ranges and outlier channels then come from one float pass over
   the calibration data (``calibration.py``).
4. Every layer the runner did not reach (all of them without statistics; outside the blocks
   otherwise, e.g. the head) is solved alone by its algorithm without data: RTN is the
   case with no statistics.
5. The packed ``QuantizedLinear`` replaces the float layer (whose weight is freed); what is
   left (norms, embedding) is cast to the recipe's compute dtype.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import replace
from types import SimpleNamespace

import torch
from torch import nn

from lowbit.algorithms import get_algorithm
from lowbit.algorithms.group import Member, solve_group, stats_needed
from lowbit.formats import get_format, qparams_from_range
from lowbit.formats.lookup import is_row_codebook
from lowbit.model.arch import Arch, resolve_arch
from lowbit.model.calib_memory import REBATCH_TOKENS, _batches, solve_allocations
from lowbit.model.calibration import collect_input_ranges
from lowbit.model.fold_rotation import fold_residual_rotation
from lowbit.model.gguf_auto import gguf_auto_recipe
from lowbit.model.mixed import auto_recipe
from lowbit.model.recipe import (
    GGUF_AUTO,
    Recipe,
    RecipeError,
    Scheme,
    gguf_kind,
    is_auto,
    resolve_gguf_mix,
)
from lowbit.model.runner import _check_enough, _Run, _run_blocks, _token_count, build_layer
from lowbit.model.summary import QuantizeSummary, _dtype_name, _tensor_bytes
from lowbit.model.targets import (
    _set_module,
    cast_unquantized,
    compute_dtype,
    drop_missing_rotations,
    find_targets,
    split_outliers,
    tie_embedding_to_head,
)


def quantize_model(
    model: nn.Module,
    recipe: Recipe | str,
    calibration: Iterable | None = None,
    *,
    progress: bool = True,
    backend: str | None = None,
    sequential: bool = True,
    sample_tokens: int = 512,
    autocast: bool = False,
    half_inputs: bool = True,
    arch: Arch | None = None,
    batch_tokens: int = REBATCH_TOKENS,
) -> QuantizeSummary:
    """Quantize ``model`` in place with ``recipe``; returns a summary (also on the model).

    Block-runner options: ``sequential=False`` collects every group's statistics of a block
    in one pass (the original GPTQ order, fewer forward passes); ``sample_tokens`` tokens
    per group are kept for the SmoothQuant / static-range searches; ``autocast=True`` runs
    the calibration forwards in bfloat16 (statistics still accumulate in float32);
    ``half_inputs=False`` holds the blocks' inputs in float32 instead of float16;
    ``batch_tokens`` caps the tokens of one calibration forward (``REBATCH_TOKENS``).
    """
    recipe = Recipe.parse(recipe)
    t0 = time.perf_counter()
    batches = None
    # what a calibrated run reports per layer (``model.lowbit_calibration``)
    report = is_auto(recipe) or any(s is not None and s.weight is not None and (
        s.algorithm != "rtn" or _codebook(s)) for s in [recipe.default] + [
        r.scheme for r in recipe.rules])
    if recipe.fold_rotation is not None:  # the model itself changes: a plain decoder still
        fold_residual_rotation(model)
    recipe = resolve_gguf_mix(model, recipe)
    if is_auto(recipe):
        batches = None if calibration is None else _batches(calibration, model, batch_tokens)
        resolve = gguf_auto_recipe if recipe.name.startswith(GGUF_AUTO) else auto_recipe
        recipe = replace(resolve(model, recipe, batches, progress=progress),
                         fold_rotation=recipe.fold_rotation)
    summary = QuantizeSummary(recipe.name)
    targets = drop_missing_rotations(find_targets(model, recipe), summary)
    if recipe.default is not None and recipe.default.weight is None and not recipe.rules:
        return _cast_only(model, recipe, targets, summary, t0)
    plan = {n: s for n, _, s in targets if s is not None and s.weight is not None}
    summary.kept = [n for n, _, s in targets if n not in plan]
    summary.bytes_before = sum(_tensor_bytes(m.weight) + _tensor_bytes(m.bias)
                               for n, m, _ in targets if n in plan)
    static = [n for n in plan if plan[n].needs_calibration]
    del targets  # names only from here: each float layer is freed once it is packed
    blockwise = any(get_algorithm(s.algorithm).needs or _codebook(s) for s in plan.values())
    done, ranges, run = set(), {}, None
    if blockwise:
        if batches is None and calibration is not None:
            batches = _batches(calibration, model, batch_tokens)
        _require_data(recipe, plan, batches)
        run = _Run(model, plan, backend, sample_tokens)
        if batches is not None and any(stats_needed(s) for s in plan.values()):
            _check_enough(plan, model, sum(_token_count(b) for b in batches))
            arch = arch or resolve_arch(model)
            ctx = torch.autocast("cpu", torch.bfloat16) if autocast else nullcontext()
            with torch.no_grad(), ctx:
                done = _run_blocks(run, arch, batches, sequential, progress, half_inputs)
    elif static:  # static activation ranges, outlier channels: one float pass
        if calibration is None:
            raise RecipeError(
                f"recipe {recipe.name!r} needs calibration data (static activation ranges); "
                f"pass calibration=lowbit.data.text('default', tokenizer) or --calibration FILE")
        if callable(getattr(calibration, "batches", None)):
            calibration = calibration.batches(model)
        layers = [(n, model.get_submodule(n), plan[n]) for n in static]
        ranges = collect_input_ranges(model, layers, calibration, progress=progress)
        del layers
    info = run.info if run is not None else {}
    for name in _progress([n for n in plan if n not in done], progress):
        _quantize_alone(model, name, plan[name], ranges, backend, info if report else None,
                        blockwise)
    for name in plan:
        q = model.get_submodule(name)
        summary.layers += 1
        summary.bytes_after += q.weight_nbytes() + _tensor_bytes(q.bias)
        summary.kernels[q.kernel] = summary.kernels.get(q.kernel, 0) + 1
    if gguf_kind(recipe) is not None:
        tie_embedding_to_head(model)
    cast_unquantized(model, compute_dtype(recipe))
    summary.seconds = time.perf_counter() - t0
    model.lowbit_recipe = recipe
    model.lowbit_summary = summary
    if report:
        model.lowbit_calibration = {"layers": info, "notes": list(arch.notes) if arch else []}
    return summary


def _codebook(scheme: Scheme) -> bool:
    return is_row_codebook(get_format(scheme.weight.format))


def _require_data(recipe: Recipe, plan: dict[str, Scheme], batches) -> None:
    if batches is None and any(get_algorithm(s.algorithm).needs_data for s in plan.values()):
        names = sorted({s.algorithm for s in plan.values() if stats_needed(s)})
        raise RecipeError(
            f"recipe {recipe.name!r} ({', '.join(names)}) needs calibration data; pass "
            f"calibration=lowbit.data.text('default', tokenizer) or --calibration FILE")


def _quantize_alone(model: nn.Module, name: str, scheme: Scheme, ranges: dict, backend,
                    info: dict | None, blockwise: bool) -> None:
    """Solve one layer by its algorithm without statistics (round to nearest for the
    calibrated ones), with its static input range and outlier channels from ``ranges``."""
    if blockwise and scheme.activation is not None and scheme.activation.mode == "static":
        raise RecipeError(
            f"{name} lies outside the model's blocks, so no static activation range is "
            f"calibrated for it: keep it (recipe.with_keep({name!r})) or give it a "
            f"weight-only scheme")
    linear = model.get_submodule(name)
    module, outliers = linear, None
    if scheme.outlier_channels > 0:
        rest, outliers = split_outliers(linear.weight, ranges[name].channel_absmax,
                                        scheme.outlier_channels)
        module = SimpleNamespace(weight=rest, bias=linear.bias, in_features=rest.shape[1],
                                 out_features=rest.shape[0])
    with solve_allocations():
        (sol,) = solve_group([Member(name, module, scheme)], None, None)
    if scheme.activation is not None and scheme.activation.mode == "static":
        stats = ranges[name]
        lo, hi = stats.min, stats.max
        if outliers is not None:  # the outlier channels no longer reach the int8 path
            rest = stats.channel_absmax.index_fill(0, outliers[0], 0).max()
            lo, hi = torch.maximum(lo, -rest), torch.minimum(hi, rest)
        sol.input_qparams = qparams_from_range(lo, hi, get_format("int8"), symmetric=True)
    if info is not None:
        info[name] = sol.info
    _set_module(model, name, build_layer(sol, backend, outliers))


def _cast_only(model, recipe, targets, summary, t0) -> QuantizeSummary:
    """fp16 / bf16: every parameter cast, nothing quantized."""
    dtype = compute_dtype(recipe)
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


def _progress(items, enabled: bool):
    if not enabled or len(items) < 2:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="quantizing", unit="layer", leave=False, disable=None)
