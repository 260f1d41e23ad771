"""Wall time of a 12-cell bench sweep run serially and as Ray tasks on a local cluster.

The sweep is ``lowbit bench`` on one model: the FP32 baseline and 11 round-to-nearest recipes
(12 cells), scored on ``--windows`` windows of ``--window`` tokens of pydoc, no speed rows.
It runs three times, each into a fresh report folder:
- serial, ``--threads`` torch threads (the default CLI run: one process uses every core);
- serial, 1 thread;
- on Ray: a local cluster of ``--workers`` CPUs, each task one torch thread (each worker
  loads the model itself, once); the cluster's start is timed apart and included.
The Ray rows are checked against the 1-thread serial rows (same numbers expected: the same
code on the same number of threads). Speedup is bounded by the cores: on 2 cores, 2 workers
at best halve the 1-thread serial time, and other jobs on the machine disturb every number
(the load average before and after is recorded: rerun on a quiet machine if it is high).

Run: .venv/bin/python benchmarks/ray_sweep.py [--model smollm2-135m] [--workers 2]
Writes docs/ray_sweep.json (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# formats with a packed kernel (int8, int4 containers): a cell costs seconds, not minutes
RECIPES = ("w8", "w4g32", "w4g64", "w4g128", "w4g64-izp", "w4g128-izp", "w3g32", "w3g64",
           "w3g128", "w2g32", "w2g64")


def _same(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("seconds", "quantize_s", "eval_s", "node")}


def _sweep(settings, out: Path, **kwargs) -> tuple[float, dict]:
    from lowbit.eval.bench import run_bench

    t0 = time.perf_counter()
    results = run_bench(settings, out, progress=False, write_report=False, **kwargs)
    seconds = time.perf_counter() - t0
    bad = [r["id"] for r in results["rows"] if r["status"] != "ok"]
    if bad:
        sys.exit(f"ray_sweep: rows failed: {bad}")
    return seconds, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="threads of the serial run")
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--output", default="docs/ray_sweep.json")
    args = parser.parse_args()

    from lowbit.model.distributed import INSTALL, ray_installed

    if not ray_installed():
        sys.exit(f"ray_sweep needs Ray: {INSTALL}")
    import ray
    import torch

    from lowbit.eval.bench import BenchSettings
    from lowbit.kernels.cpu import cpu_line
    from lowbit.model.distributed import start

    command = ".venv/bin/python benchmarks/ray_sweep.py " + shlex.join(sys.argv[1:])
    print(f"CPU: {cpu_line()}; {os.cpu_count()} cores")
    print(f"command: {command.strip()}")
    load_before = os.getloadavg()

    def settings(threads: int) -> BenchSettings:
        return BenchSettings(model=args.model, recipes=RECIPES, window=args.window,
                             n_windows=args.windows, speed=False, threads=threads)

    from lowbit.model import load_model

    load_model(args.model)  # the cache is warm for every run (the FP32 folder exists)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["serial"], serial = _sweep(settings(args.threads), Path(tmp) / "serial")
        print(f"serial, {args.threads} threads: {runs['serial']:.1f} s")
        runs["serial_1_thread"], serial1 = _sweep(settings(1), Path(tmp) / "serial1")
        print(f"serial, 1 thread: {runs['serial_1_thread']:.1f} s")
        t0 = time.perf_counter()
        start(num_cpus=args.workers)
        runs["ray_start"] = time.perf_counter() - t0
        seconds, on_ray = _sweep(settings(1), Path(tmp) / "ray", ray=True)
        runs["ray"] = runs["ray_start"] + seconds
        ray.shutdown()
    identical = [_same(r) for r in on_ray["rows"]] == [_same(r) for r in serial1["rows"]]
    workers = sorted({r["node"]["pid"] for r in on_ray["rows"]})
    print(f"ray, {args.workers} workers x 1 thread: {runs['ray']:.1f} s (cluster start "
          f"{runs['ray_start']:.1f} s); rows equal to the 1-thread serial run: {identical}")
    print(f"speedup vs serial {args.threads} threads: {runs['serial'] / runs['ray']:.2f}x; "
          f"vs serial 1 thread: {runs['serial_1_thread'] / runs['ray']:.2f}x")
    load_after = os.getloadavg()
    print(f"load average before / after: {load_before[0]:.1f} / {load_after[0]:.1f}")
    record = {
        "command": command.strip(), "cpu": cpu_line(), "cores": os.cpu_count(),
        "torch": torch.__version__, "ray": ray.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": args.model, "cells": 1 + len(RECIPES), "recipes": list(RECIPES),
        "window": args.window, "windows": args.windows, "serial_threads": args.threads,
        "ray_workers": args.workers, "ray_worker_processes_used": len(workers),
        "seconds": {k: round(v, 2) for k, v in runs.items()},
        "speedup_vs_serial": round(runs["serial"] / runs["ray"], 3),
        "speedup_vs_serial_1_thread": round(runs["serial_1_thread"] / runs["ray"], 3),
        "ray_rows_equal_serial_1_thread": identical,
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "kld_mean": {r["id"]: r["kld_mean"] for r in serial["rows"]},
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(part, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
