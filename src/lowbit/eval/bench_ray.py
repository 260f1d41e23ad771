"""``lowbit bench --ray``: the matrix's rows as Ray tasks (``lowbit.model.distributed``).

A task receives the row's id, the ``BenchSettings`` (names and numbers) and the report
folder's path (for the row's command); its worker loads the model by name or path once and
runs the row exactly as the serial run does (``bench_rows.run_entry``), on the same number of
threads. Rows come back as they finish and are merged into results.json at once, so an
interrupted run keeps them and ``--resume`` skips them. A row whose worker died twice (a
crash, the OOM killer) is recorded as failed; the other rows keep their results.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from lowbit.eval.bench_rows import BenchError, BenchSettings, Entry, plan, row_head, run_entry

__all__ = ["bench_cell", "run_rows_on_ray"]


def _load(settings: BenchSettings):
    from lowbit.data import tokens
    from lowbit.eval.embeddings import is_encoder
    from lowbit.model import load_model, load_tokenizer

    base = load_model(settings.model)
    if is_encoder(base):
        raise BenchError(f"{settings.model} is an encoder (no language-model head) and bench "
                         "ranks configs by perplexity; compare its recipes with `lowbit eval "
                         "MODEL --recipe R --baseline MODEL` (embedding similarity)")
    tok = load_tokenizer(settings.model)
    return base, tok, tokens(settings.data, tok)[: settings.window * settings.n_windows]


def bench_cell(entry_id: str, settings: BenchSettings, report_dir: str) -> dict:
    """One row, in a Ray worker: the model is loaded there (once per worker and model)."""
    from lowbit.model.distributed import remember

    entry = next(e for e in plan(settings) if e.id == entry_id)
    key = ("bench", settings.model, settings.data, settings.window, settings.n_windows)
    base, tok, ids = remember(key, lambda: _load(settings))
    return run_entry(entry, base, tok, ids, settings, Path(report_dir))


def run_rows_on_ray(todo: list[Entry], settings: BenchSettings, out: Path, progress: bool,
                    on_row: Callable[[dict], None]) -> None:
    """Run ``todo``'s rows on the Ray cluster this process is connected to (``start``);
    ``on_row(row)`` as each finishes (a dead worker's row has status "failed")."""
    from lowbit.model.distributed import run_cells

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="bench on ray", unit="config", disable=None)

    def done(i: int, row: dict | None, where: dict | None, error: str | None) -> None:
        if error is not None:
            row = row_head(todo[i], settings, out) | {"status": "failed", "node": where,
                                                       "error": f"worker died: {error}"}
        on_row(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{row['id']} on {row['node'] and row['node']['hostname']}")

    ids = [e.id for e in todo]
    try:
        run_cells(bench_cell, ids, ids, shared=(settings, str(out)), on_done=done,
                  threads=settings.threads)
    finally:
        if bar is not None:
            bar.close()
            sys.stderr.flush()
