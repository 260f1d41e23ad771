"""``auto:<bpw>`` candidate scoring on Ray: each layer (each layer x candidate with
``measure="all"``) scored as a Ray task (``lowbit.model.distributed``), and for GPTQ-like
algorithms each group of layers x candidate solved as one (``solved_on_ray``: a worker runs
the float pass over the solving slice once and keeps every group's Hessian).

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

__all__ = ["Job", "score_cell", "sensitivity_on_ray", "solve_cell", "solved_on_ray"]


@dataclass(frozen=True)
class Job:
    """What every task of one scoring sweep shares (names and numbers)."""

    sweep: str
    spec: str
    fingerprint: str
    folded: bool  # the residual rotation was folded in after loading (-frot)
    names: tuple[str, ...]
    top_k: int


def _model(job: Job):
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
    return model


def score_cell(cell: tuple, job: Job, batches: list, candidates: dict[str, Scheme]) -> dict:
    """One layer's entry at some candidates, in a Ray worker (``Scorer.score``)."""
    from lowbit.model.distributed import remember

    name, cands, kl_at, solved = cell
    scorer = remember(("mixed", job),
                      lambda: Scorer(_model(job), batches, list(job.names), job.top_k))
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
    job = _job(address, model, names, folded, top_k)
    cells, labels = _cells(names, candidates, anchor, measure, solved)
    out = {n: {"kl": {}, "bits": {}, "err": {}, "numel": 0} for n in names}

    def done(i: int, entry: dict) -> None:
        for key in ("kl", "bits", "err"):
            out[cells[i][0]][key].update(entry[key])
        out[cells[i][0]]["numel"] = entry["numel"]

    _run(score_cell, cells, labels, (job, list(batches), candidates), done, progress)
    for entry in out.values():  # candidate order, as the serial run (ties resolve alike)
        for key in ("kl", "bits", "err"):
            entry[key] = {c: entry[key][c] for c in candidates if c in entry[key]}
    return out


def solve_cell(cell: tuple, job: Job, batches: list, candidates: dict[str, Scheme]) -> dict:
    """One group solved at one candidate, in a Ray worker (``solve_candidate``)."""
    from lowbit.model.distributed import remember
    from lowbit.model.mixed_scoring import solve_candidate

    index, cand, keep = cell
    model, stats = remember(("solve", job), lambda: _with_stats(_model(job), batches, job))
    group, st = stats[index]
    return solve_candidate(model, group, st, candidates[cand], keep)


def _with_stats(model, batches, job: Job):
    from lowbit.model.mixed_scoring import group_stats

    return model, list(group_stats(model, batches, list(job.names)))


def solved_on_ray(address: str, model: nn.Module, batches: list,
                  candidates: dict[str, Scheme], names: list[str], *, keep: set[str],
                  progress: bool, folded: bool) -> dict[str, dict]:
    """``mixed.solved_errors`` with each group x candidate solved on the Ray cluster."""
    from lowbit.model.arch import resolve_arch

    job = _job(address, model, names, folded, 0)
    wanted = set(names)
    groups = [[n for n in g.linears if n in wanted] for b in resolve_arch(model).blocks
              for g in b.groups]
    groups = [g for g in groups if g]  # the order group_stats yields them in
    cells = [(i, c, c in keep) for i in range(len(groups)) for c in candidates]
    labels = [f"{groups[i][0]}/{c}" for i, c, _ in cells]
    found: dict = {}

    def done(i: int, solved: dict) -> None:
        found[cells[i][:2]] = solved

    _run(solve_cell, cells, labels, (job, list(batches), candidates), done, progress)
    out: dict[str, dict] = {}
    for i, group in enumerate(groups):  # the serial run's order
        for n in group:
            out[n] = {"err": {}, "w_hat": {}}
        for c in candidates:
            for n, (err, w_hat) in found[i, c].items():
                out[n]["err"][c] = err
                if w_hat is not None:
                    out[n]["w_hat"][c] = w_hat
    return out


def _job(address: str, model: nn.Module, names, folded: bool, top_k: int) -> Job:
    from lowbit.model.distributed import fingerprint, start

    spec = getattr(model, "lowbit_spec", None)
    if not spec or spec.startswith("<"):
        raise RecipeError("auto:<bpw> scoring on Ray loads the model in each worker by name or "
                          "path: load it with lowbit.load_model('name or folder'), or unset "
                          "LOWBIT_RAY to score here")
    job = Job(uuid.uuid4().hex, spec, fingerprint(model), folded, tuple(names), top_k)
    start(address)
    return job


def _run(fn, cells: list, labels: list[str], shared: tuple, done, progress: bool) -> None:
    """``run_cells`` with a progress bar; any failed cell fails the scoring, named."""
    from lowbit.model.distributed import DistributedError, run_cells

    failed: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="scoring candidates on ray", unit="cell",
                   leave=False, disable=None)

    def on_done(i: int, result, where, error) -> None:
        if error is not None:
            failed.append(f"{labels[i]} ({error})")
        else:
            done(i, result)
        if bar is not None:
            bar.update(1)

    try:
        run_cells(fn, cells, labels, shared=shared, on_done=on_done,
                  threads=torch.get_num_threads())
    finally:
        if bar is not None:
            bar.close()
    if failed:
        raise DistributedError(
            f"{len(failed)} of {len(cells)} auto:<bpw> scoring cells failed, e.g. {failed[0]}; "
            "no recipe can be chosen without them: run again (check the nodes' memory), or "
            "unset LOWBIT_RAY to score here")
