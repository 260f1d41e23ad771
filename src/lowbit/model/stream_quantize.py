"""``quantize_checkpoint(source, recipe, output)``: quantize a model bigger than memory.

The model's architecture is built on the ``meta`` device (``lazy_model``) and its parts, the
*units*, are read from the safetensors files one at a time: each decoder block, then the
head with the final norm, then what is left (the embedding). Each unit is quantized as
``pipeline.quantize_model`` would (the same targets, schemes, ``_quantize_alone`` for layers
without statistics, and for calibrated algorithms the block runner's own ``_Walk``, which
already holds one block's calibration inputs at a time), cast, written to its own output
shard and put back on ``meta``. Memory therefore holds one unit's float weights, the
calibration inputs of one block and the solver's buffers, whatever the model's size
(``stream_memory`` estimates it, and refuses a ``max_memory`` below one unit's need).

The output is a sharded lowbit checkpoint (shards, ``model.safetensors.index.json``,
``manifest.json``) that ``lowbit.load`` reads like any other. It is written into
``.NAME.partial`` and renamed to ``NAME`` when complete; an interrupted run continues with
``resume=True`` from the last finished unit and gives the same bytes (``stream_state``).

Not streamed (refused with a hint): ``auto:`` recipes (they score the whole model), ``-frot``
(it rotates the whole residual stream first) and static activation ranges of data-free
recipes (one float pass over the whole model).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.algorithms import get_algorithm
from lowbit.algorithms.group import stats_needed
from lowbit.model.arch import resolve_arch
from lowbit.model.calib_memory import REBATCH_TOKENS, _batches, _give_back_free_memory
from lowbit.model.lazy_model import LazyModel
from lowbit.model.pipeline import _codebook, _quantize_alone, _require_data
from lowbit.model.recipe import Recipe, RecipeError, gguf_kind, is_auto, resolve_gguf_mix
from lowbit.model.runner import (
    _branches_compose,
    _capture_held,
    _check_enough,
    _Run,
    _token_count,
    _Walk,
)
from lowbit.model.serialization import (
    _quantized_entries,
    build_manifest,
    check_target,
    swap_in,
)
from lowbit.model.shards import ShardWriter
from lowbit.model.stream_state import PartialRun
from lowbit.model.stream_units import Unit, check_memory, outside_paths, plan_units, unit_tensors
from lowbit.model.summary import QuantizeSummary, _tensor_bytes
from lowbit.model.targets import (
    cast_unquantized,
    check_finite_weights,
    compute_dtype,
    drop_missing_rotations,
    find_targets,
    tie_embedding_to_head,
)


@dataclass
class StreamedCheckpoint:
    """What ``quantize_checkpoint`` did: the folder, the summary, and how many units this
    call quantized and how many an interrupted earlier run had finished."""

    path: Path
    summary: QuantizeSummary
    units: int
    resumed: int
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def quantize_checkpoint(
    source: str | os.PathLike,
    recipe: Recipe | str,
    output: str | os.PathLike,
    calibration: Iterable | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    max_memory: int | str | None = None,
    tokenizer=None,
    progress: bool = True,
    backend: str | None = None,
    sequential: bool = True,
    sample_tokens: int = 512,
    half_inputs: bool = True,
    batch_tokens: int = REBATCH_TOKENS,
    on_unit: Callable[[int, int, str], None] | None = None,
) -> StreamedCheckpoint:
    """Quantize the Hugging Face folder ``source`` with ``recipe`` into the checkpoint folder
    ``output``, one unit at a time (module docstring). ``calibration`` as for
    ``lowbit.quantize``; ``max_memory`` (bytes or "8GiB"; default what the machine has) is
    checked against one unit's need; ``resume`` continues an interrupted run; ``on_unit(i,
    count, name)`` is called after each unit is written."""
    from lowbit.model.stream_memory import available_memory, parse_size

    t0 = time.perf_counter()
    recipe = Recipe.parse(recipe)
    _refuse_whole_model(recipe)
    target = check_target(output, overwrite)
    lazy = LazyModel.open(source)
    model = lazy.model
    recipe = resolve_gguf_mix(model, recipe)
    summary = QuantizeSummary(recipe.name)
    targets = drop_missing_rotations(find_targets(model, recipe, check_finite=False), summary)
    plan = {n: s for n, _, s in targets if s is not None and s.weight is not None}
    summary.kept = [n for n, _, s in targets if n not in plan]
    summary.bytes_before = sum(_tensor_bytes(m.weight) + _tensor_bytes(m.bias)
                               for n, m, _ in targets if n in plan)
    del targets
    arch = resolve_arch(model)
    tie = gguf_kind(recipe) is not None and bool(getattr(model.config, "tie_word_embeddings",
                                                         False))
    units = plan_units(lazy, arch, tie)
    blockwise = any(get_algorithm(s.algorithm).needs or _codebook(s) for s in plan.values())
    if not blockwise and any(s.needs_calibration for s in plan.values()):
        raise RecipeError(
            f"recipe {recipe.name!r} calibrates static activation ranges in one float pass "
            "over the whole model, which streaming does not run: quantize it in memory, or "
            "use a calibrated weight recipe (e.g. w4g128-gptq)")
    batches = None
    if blockwise:
        batches = None if calibration is None else _batches(calibration, model, batch_tokens)
        _require_data(recipe, plan, batches)
    stats = batches is not None and any(stats_needed(s) for s in plan.values())
    tokens = sum(_token_count(b) for b in batches) if stats else 0
    if stats:
        _check_enough(plan, model, tokens)
    cap = parse_size(max_memory) if max_memory is not None else available_memory()
    check_memory(lazy, units, plan, cap, tokens, batch_tokens)
    model.lowbit_recipe = recipe
    settings = _settings(lazy, recipe, batches, sequential, sample_tokens, half_inputs,
                         batch_tokens, backend)
    partial = PartialRun(target, settings, resume)
    resumed = partial.resumed
    writer = ShardWriter(partial.folder, len(units))
    run = _Run(model, plan, backend, sample_tokens)
    dtype = compute_dtype(recipe)
    walk = None
    bar = _bar(units, progress)
    for index, unit in enumerate(units):
        if partial.done(index) is not None:
            bar.update(1)
            continue
        if stats and walk is None and unit.kind != "rest":
            walk = _start_walk(lazy, arch, run, batches, partial, sequential, half_inputs)
        lazy.materialize(unit.paths, unit.whole)
        check_finite_weights([(n, model.get_submodule(n), plan[n]) for n in plan
                              if unit.holds(n)])
        done = _calibrate(walk, unit, arch, partial)
        for name in [n for n in plan if unit.holds(n) and n not in done]:
            _quantize_alone(model, name, plan[name], {}, backend, run.info, blockwise)
        if unit.kind == "head" and tie:
            tie_embedding_to_head(model)
        for path in unit.paths:
            cast_unquantized(model.get_submodule(path), dtype)
        tensors, record = unit_tensors(lazy, unit, plan, _quantized_entries)
        writer.write(index, tensors)
        del tensors
        held = None
        if walk is not None and unit.kind == "block":
            held = {"hidden": walk.hidden}
            if walk.hidden_float is not None:
                held["hidden_float"] = walk.hidden_float
        partial.finish(index, record, held)
        if walk is not None and unit.kind == "head":
            walk.hidden.clear()  # the last use of the calibration inputs
        lazy.evict(unit.paths, unit.whole)
        _release()
        bar.update(1)
        if on_unit is not None:
            on_unit(index, len(units), unit.name)
    bar.close()
    path = _finish(lazy, partial, writer, units, target, tokenizer, summary)
    summary.seconds = time.perf_counter() - t0
    return StreamedCheckpoint(path, summary, len(units), resumed, list(arch.notes))


def _release() -> None:
    """Free the finished unit now: its modules can sit in reference cycles (collected
    only by ``gc``), and glibc keeps freed heap pages until asked (``malloc_trim``)."""
    import gc

    gc.collect()
    _give_back_free_memory()


def _refuse_whole_model(recipe: Recipe) -> None:
    why = ("auto: recipes score candidates on the whole model" if is_auto(recipe) else
           "-frot rotates the whole residual stream first" if recipe.fold_rotation else None)
    if why:
        raise RecipeError(f"recipe {recipe.name!r} cannot be streamed ({why}): quantize it in "
                          "memory, or pick a recipe without it (e.g. w4g64-gptq-rot)")


def _start_walk(lazy: LazyModel, arch, run: _Run, batches, partial, sequential: bool,
                half_inputs: bool) -> _Walk:
    """Block 0's calibration inputs (the embedding is read for it and put back), or on a
    resume the inputs held after the last finished block; the split of the blocks into
    residual branches is decided on block 0 (``_calibrate``) and kept across a resume."""
    paths = outside_paths(lazy, arch)
    lazy.materialize(paths, whole=False)
    try:
        hidden, kwargs_list, dtype = _capture_held(lazy.model, arch.blocks[0].module, batches,
                                                   half_inputs)
    finally:
        lazy.evict(paths, whole=False)
    held = partial.held()
    split = partial.extra.get("split")
    walk = _Walk(run, hidden, kwargs_list, dtype, bool(split), sequential, half_inputs)
    if held is not None:
        walk.hidden[:] = held["hidden"]
        if walk.reference:
            walk.hidden_float = held["hidden_float"]
    return walk


def _calibrate(walk: _Walk | None, unit: Unit, arch, partial: PartialRun) -> set[str]:
    """The unit's linears quantized from calibration statistics (none without ``walk``)."""
    if walk is None or unit.kind == "rest":
        return set()
    if unit.kind == "head":
        return walk.head(arch)
    if "split" not in partial.extra:
        partial.extra["split"] = _branches_compose(arch, walk.hidden, walk.kwargs_list,
                                                   walk.dtype)
        partial.extra["notes"] = list(arch.notes)
    walk.split = partial.extra["split"]
    arch.notes[:] = partial.extra.get("notes", [])
    return walk.block(unit.block)


def _finish(lazy, partial, writer, units, target, tokenizer, summary) -> Path:
    """Index, manifest and tokenizer into the partial folder, then rename it into place."""
    import json

    from lowbit.model.serialization import MANIFEST

    records = [partial.done(i) for i in range(len(units))]
    quantized, aliases, dtypes = {}, {}, {}
    for r in records:
        quantized.update(r["quantized"])
        aliases.update(r["aliases"])
        dtypes.update(r["dtypes"])
        summary.layers += r["summary"]["layers"]
        summary.bytes_after += r["summary"]["bytes_after"]
        for k, n in r["summary"]["kernels"].items():
            summary.kernels[k] = summary.kernels.get(k, 0) + n
    writer.write_index()
    manifest = build_manifest(lazy.model, quantized, aliases, dtypes)
    manifest["streamed"] = {"units": len(units)}
    (partial.folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(partial.folder))
    partial.clean()
    swap_in(partial.folder, target)
    return target


def _settings(lazy, recipe, batches, sequential, sample_tokens, half_inputs, batch_tokens,
              backend) -> dict:
    """What a resumed run must share with the interrupted one."""
    digest = hashlib.sha256()
    for b in batches or []:
        t = b if isinstance(b, torch.Tensor) else torch.as_tensor(b)
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.contiguous().numpy().tobytes())
    files = sorted({str(e[0].name): e[0].stat().st_size for e in lazy.files.entries.values()}
                   .items())
    from lowbit.version import __version__

    return {"source": str(lazy.folder.resolve()), "files": files, "recipe": recipe.to_dict(),
            "calibration": digest.hexdigest() if batches else None, "sequential": sequential,
            "sample_tokens": sample_tokens, "half_inputs": half_inputs,
            "batch_tokens": batch_tokens, "backend": backend, "lowbit": __version__,
            "threads": torch.get_num_threads()}


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(units, progress: bool):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=len(units), desc="streamed quantization", unit="part", leave=False,
                disable=None)


__all__ = ["StreamedCheckpoint", "quantize_checkpoint"]
