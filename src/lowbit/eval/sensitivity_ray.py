"""``lowbit sensitivity --ray``: each unit (a layer, or a block) as a Ray task.

A task receives the unit's name and a small ``Job`` (the model's name or path, the recipe,
the measuring options); its worker loads the model by name or path once per sweep, checks it
is the caller's (``distributed.fingerprint``), computes the baseline's log-probabilities as
the serial run does and measures the units it is given (``sensitivity.measure_unit``), on
the caller's number of torch threads, so the numbers equal the serial run's. A unit whose
worker died twice is named in the result's notes and has no row.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lowbit.eval.sensitivity import (
    SensitivityError,
    SensitivityResult,
    measure_unit,
    plan_units,
    prepare,
)

__all__ = ["Job", "sensitivity_cell", "sensitivity_on_ray"]


@dataclass(frozen=True)
class Job:
    """What every task of one sweep shares (names and numbers, no tensors but the text)."""

    sweep: str
    spec: str
    fingerprint: str
    recipe: object  # a Recipe
    names: tuple[str, ...] | None
    per: str
    data: str
    window: int
    n_windows: int
    protocol: str


def _setup(job: Job, calibration):
    from lowbit.model import load_model, load_tokenizer
    from lowbit.model.distributed import fingerprint

    model = load_model(job.spec)
    if fingerprint(model) != job.fingerprint:
        raise SensitivityError(
            f"the model a Ray worker loads from {job.spec!r} differs from the caller's (changed "
            "after loading, or another file at that path on this node): pass the model as "
            "load_model returns it, and the same files on every node")
    setup = prepare(model, load_tokenizer(job.spec), job.recipe, job.names, job.per, job.data,
                    job.window, job.n_windows, job.protocol, calibration)
    return model, setup


def sensitivity_cell(unit: str, job: Job, calibration):
    """One unit, in a Ray worker: ``(LayerSensitivity, baseline PPL)``."""
    from lowbit.model.distributed import remember

    model, setup = remember(("sensitivity", job), lambda: _setup(job, calibration))
    return measure_unit(model, setup, unit, dict(setup.units)[unit]), setup.base_ppl


def sensitivity_on_ray(address: str, model, recipe, *, names: Sequence[str] | None, per: str,
                       data: str, window: int, n_windows: int, protocol: str,
                       calibration: Iterable | None, progress: bool) -> SensitivityResult:
    """``sensitivity`` with its units measured on the Ray cluster at ``address``."""
    import time

    from lowbit.model.distributed import fingerprint, run_cells, start

    t0 = time.perf_counter()
    spec = getattr(model, "lowbit_spec", None)
    if not spec or spec.startswith("<"):
        raise SensitivityError("Ray workers load the model themselves by name or path: load it "
                               "with lowbit.load_model('name or folder'), or run without --ray")
    units, notes = plan_units(model, recipe, names, per)
    job = Job(uuid.uuid4().hex, spec, fingerprint(model), recipe,
              None if names is None else tuple(names), per, str(data), window, n_windows,
              protocol)
    start(address)
    calib = None if calibration is None else list(calibration)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), desc=f"sensitivity per {per} on ray", unit=per,
                   leave=False, disable=None)
    found: dict[int, object] = {}
    base_ppl = [float("nan")]

    def done(i: int, result, where, error) -> None:
        if error is not None:
            notes.append(f"{units[i][0]} was not measured: its worker died ({error})")
        else:
            found[i], base_ppl[0] = result
        if bar is not None:
            bar.update(1)

    try:
        names_ = [u for u, _ in units]
        run_cells(sensitivity_cell, names_, names_, shared=(job, calib), on_done=done,
                  threads=torch.get_num_threads())
    finally:
        if bar is not None:
            bar.close()
    rows = [found[i] for i in sorted(found)]
    return SensitivityResult(recipe.name, per, window, n_windows, protocol, str(data),
                             base_ppl[0], rows, notes, time.perf_counter() - t0)
