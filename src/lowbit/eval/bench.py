"""The benchmark matrix: every recipe, and every installed peer's nearest equivalent, on the same
model, data and metric in one run.

The baseline (the unquantized model) is loaded once and its log-probabilities computed once;
each recipe quantizes a fresh copy of it. After every row ``results.json`` is rewritten
atomically, so an interrupted run keeps what finished and ``resume=True`` skips it. Each row
carries the command that reproduces its numbers and the node that ran it. ``ray=`` runs the
rows as Ray tasks instead (``bench_ray``), merged into the same results.json as they finish.
``report.write_report`` turns the results into report.md / report.html with plots.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shlex
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from lowbit.eval.bench_rows import (
    CALIBRATION_TOKENS,
    HF_ENGINE,
    BenchError,
    BenchSettings,
    Entry,
    command_for,
    layer_errors,
    plan,
    split_list,
)
from lowbit.eval.bench_rows import run_entry as _run_entry
from lowbit.eval.peers import peer_status

__all__ = ["CALIBRATION_TOKENS", "HF_ENGINE", "RESULTS_FILE", "BenchError", "BenchSettings",
           "Entry", "add_row", "command_for", "layer_errors", "plan", "run_bench", "split_list"]

RESULTS_FILE = "results.json"
RESULTS_VERSION = 1
_SAME_RUN = ("model", "data", "window", "n_windows", "protocol", "speed")


def bench_command(settings: BenchSettings, report_dir: Path) -> str:
    peers = f" --peers {','.join(settings.peers)}" if settings.peers else ""
    return (f"lowbit bench {shlex.quote(settings.model)} --recipes "
            f"{shlex.quote(','.join(settings.recipes))}{peers} {settings.options()} --report "
            f"{shlex.quote(str(report_dir))}")


def _environment(settings: BenchSettings) -> dict:
    from lowbit.version import __version__

    return {"lowbit": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": settings.threads or torch.get_num_threads(),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def _write_json_atomic(path: Path, obj: dict) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(part, path)


def _open_results(out: Path, settings: BenchSettings, resume: bool, overwrite: bool) -> dict:
    path = out / RESULTS_FILE
    if path.exists() and resume:
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path} is not valid JSON ({exc}); delete it or pass another "
                             "--report folder") from exc
        old = results.get("settings", {})
        differ = [k for k in _SAME_RUN if old.get(k) != getattr(settings, k)]
        if differ:
            raise BenchError(
                f"{path} was made with other settings ("
                + ", ".join(f"{k}={old.get(k)!r}" for k in differ)
                + "); resume with the same ones, or pass another --report folder")
        merged = {"recipes": tuple(dict.fromkeys([*old["recipes"], *settings.recipes])),
                  "peers": tuple(dict.fromkeys([*old.get("peers", []), *settings.peers]))}
        results["settings"].update({k: list(v) for k, v in merged.items()})
        results["command"] = bench_command(replace(settings, **merged), out)
        return results
    if path.exists() and not overwrite:
        raise BenchError(f"{path} already holds results: pass --resume to keep its finished rows "
                         "and run the rest, --overwrite to start again, or another --report")
    out.mkdir(parents=True, exist_ok=True)
    return {"lowbit_bench_version": RESULTS_VERSION, "settings": settings.to_dict(),
            "command": bench_command(settings, out), "environment": _environment(settings),
            "peers": {}, "rows": []}


def run_bench(settings: BenchSettings, report_dir: str | os.PathLike, *, resume: bool = False,
              overwrite: bool = False, progress: bool = True, model: nn.Module | None = None,
              tokenizer=None, write_report: bool = True, ray: str | bool | None = None) -> dict:
    """Run the matrix into ``report_dir`` and return the results (also in results.json).

    ``ray``: True / "local" runs the rows as tasks on a local Ray cluster, an address on that
    cluster (default ``$LOWBIT_RAY``, else serially here); see ``bench_ray``."""
    from lowbit.model.distributed import ray_address, start

    entries = plan(settings)
    out = Path(report_dir)
    address = ray_address(ray)
    if address is not None:
        if model is not None or tokenizer is not None:
            raise BenchError("Ray workers load the model themselves by name or path: pass "
                             "settings.model as a bundled name or folder, not a loaded model")
        start(address)  # before anything is written: an unreachable cluster leaves no file
    results = _open_results(out, settings, resume, overwrite)
    for name in sorted({e.config.peer for e in entries if e.kind == "peer"}):
        results["peers"][name] = peer_status(name)
    done = {r["id"] for r in results["rows"] if r.get("status") == "ok"}
    todo = [e for e in entries if e.id not in done]
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        if todo and address is not None:
            from lowbit.eval.bench_ray import run_rows_on_ray

            run_rows_on_ray(todo, settings, out, progress,
                            on_row=lambda row: add_row(results, row, out))
        elif todo:
            _run_rows(todo, results, settings, out, progress, model, tokenizer)
    finally:
        order = {e.id: i for i, e in enumerate(entries)}
        results["rows"].sort(key=lambda r: order.get(r["id"], len(order)))
        if results["rows"]:
            _write_json_atomic(out / RESULTS_FILE, results)
            if write_report:
                from lowbit.eval.report import write_report as write

                write(results, out)
    return results


def _run_rows(todo, results, settings, out, progress, model, tokenizer) -> None:
    from lowbit.data import tokens
    from lowbit.eval.embeddings import is_encoder
    from lowbit.model import load_model, load_tokenizer

    base = load_model(model if model is not None else settings.model)
    if is_encoder(base):
        raise BenchError(f"{settings.model} is an encoder (no language-model head) and bench "
                         "ranks configs by perplexity; compare its recipes with `lowbit eval "
                         "MODEL --recipe R --baseline MODEL` (embedding similarity)")
    tok = tokenizer if tokenizer is not None else load_tokenizer(base)
    ids = tokens(settings.data, tok)[: settings.window * settings.n_windows]
    big = sum(p.numel() for p in base.parameters()) > 10_000_000
    bar = _progress(todo, progress)
    for entry in bar:
        def note(stage: str, entry=entry) -> None:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"{entry.id}: {stage}")

        note("starting")
        row = _run_entry(entry, base, tok, ids, settings, out, note=note)
        add_row(results, row, out)
        if big:  # free the candidate's copy of the weights before the next one
            gc.collect()


def add_row(results: dict, row: dict, out: Path) -> None:
    """Put a finished row in ``results`` (replacing an older one) and rewrite results.json."""
    results["rows"] = [r for r in results["rows"] if r["id"] != row["id"]] + [row]
    _write_json_atomic(out / RESULTS_FILE, results)
    if row["status"] == "failed":
        print(f"lowbit bench: {row['id']} failed: {row['error']}", file=sys.stderr)



def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="bench", unit="config", disable=None)
