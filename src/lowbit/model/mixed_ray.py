"""``auto:<bpw>`` candidate scoring on Ray: each layer (each layer x candidate with
``measure="all"``) scored as a Ray task (``lowbit.model.distributed``).

A task receives the layer's name, its candidates' names, and for a Hessian-solved algorithm
the solved weight of the candidate it measures (one layer's tensor); every task of a sweep
shares a small ``Job`` (the model's name or path) and the sensitivity slice's token ids. Its
worker loads the model by name or path once per sweep (folding the residual rotation in again
for ``-frot``), checks it is the caller's (``distributed.fingerprint``), runs the float pass
(``mixed_scoring.Scorer``) and scores its layers on the caller's number of torch threads, so the
table equals the serial run's. A cell whose worker died twice fails the scoring with an error
that names it (no recipe can be chosen without it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.model.mixed_scoring import Scorer
from lowbit.model.recipe import RecipeError, Scheme

__all__ = ["Job", "score_cell", "sensitivity_on_ray"]


@dataclass(frozen=True)
class Job:
    """What every task of one scoring sweep shares (names and numbers)."""

    sweep: str
    spec: str
    fingerprint: str
    folded: bool  # the residual rotation was folded in after loading (-frot)
    names: tuple[str, ...]
    top_k: int


def _scorer(job: Job, batches: list) -> Scorer:
    from lowbit.model.distributed import fingerprint
    from lowbit.model.loaders import load_model

    model = load_model(job.spec)
    if job.folded:
        from lowbit.model.fold_rotation import fold_residual_rotation

        fold_residual_rotation(model)
    if fingerprint(model) != job.fingerprint:
        raise RecipeError(
            f"the model a Ray worker loads from {job.spec!r} differs from the one being "
            "quantized (changed after loading, or another file at that path on this node): "
            "quantize the model as load_model returns it, or unset LOWBIT_RAY")
    return Scorer(model, batches, list(job.names), job.top_k)


def score_cell(cell: tuple, job: Job, batches: list, candidates: dict[str, Scheme]) -> dict:
    """One layer's entry at some candidates, in a Ray worker (``Scorer.score``)."""
    from lowbit.model.distributed import remember

    name, cands, kl_at, solved = cell
    scorer = remember(("mixed", job), lambda: _scorer(job, batches))
    return scorer.score(name, {c: candidates[c] for c in cands}, set(kl_at), solved)


def _cells(names, candidates, anchor: str, measure: str, solved: dict | None):
    cells, labels = [], []
    for name in names:
        groups = [(c,) for c in candidates] if measure == "all" else [tuple(candidates)]
        for cands in groups:
            part = None
            if solved is not None:
                part = {"err": {c: solved[name]["err"][c] for c in cands},
                        "w_hat": {c: w for c, w in solved[name]["w_hat"].items() if c in cands}}
            cells.append((name, cands, cands if measure == "all" else (anchor,), part))
            labels.append(f"{name}/{cands[0]}" if measure == "all" else name)
    return cells, labels


def sensitivity_on_ray(address: str, model: nn.Module, batches: list,
                       candidates: dict[str, Scheme], names: list[str], *, anchor: str,
                       measure: str, top_k: int, progress: bool, solved: dict | None,
                       folded: bool) -> dict[str, dict]:
    """``mixed.sensitivity``'s measured entries, scored on the Ray cluster at ``address``."""
    from lowbit.model.distributed import DistributedError, fingerprint, run_cells, start

    spec = getattr(model, "lowbit_spec", None)
    if not spec or spec.startswith("<"):
        raise RecipeError("auto:<bpw> scoring on Ray loads the model in each worker by name or "
                          "path: load it with lowbit.load_model('name or folder'), or unset "
                          "LOWBIT_RAY to score here")
    job = Job(uuid.uuid4().hex, spec, fingerprint(model), folded, tuple(names), top_k)
    start(address)
    cells, labels = _cells(names, candidates, anchor, measure, solved)
    out = {n: {"kl": {}, "bits": {}, "err": {}, "numel": 0} for n in names}
    failed: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="sensitivity on ray", unit="cell", leave=False,
                   disable=None)

    def done(i: int, entry, where, error) -> None:
        if error is not None:
            failed.append(f"{labels[i]} ({error})")
        else:
            for key in ("kl", "bits", "err"):
                out[cells[i][0]][key].update(entry[key])
            out[cells[i][0]]["numel"] = entry["numel"]
        if bar is not None:
            bar.update(1)

    try:
        run_cells(score_cell, cells, labels, shared=(job, list(batches), candidates),
                  on_done=done, threads=torch.get_num_threads())
    finally:
        if bar is not None:
            bar.close()
    if failed:
        raise DistributedError(
            f"{len(failed)} of {len(cells)} auto:<bpw> scoring cells failed, e.g. {failed[0]}; "
            "no recipe can be chosen without them: run again (check the nodes' memory), or "
            "unset LOWBIT_RAY to score here")
    for entry in out.values():  # candidate order, as the serial run (ties resolve alike)
        for key in ("kl", "bits", "err"):
            entry[key] = {c: entry[key][c] for c in candidates if c in entry[key]}
    return out
