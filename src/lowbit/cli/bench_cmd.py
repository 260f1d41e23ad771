"""``lowbit bench MODEL --recipes a,b,c [--peers torchao,quanto,llama.cpp] --report DIR``."""

from __future__ import annotations

import argparse
import json

from lowbit.cli.common import add_ray_argument, unquantized_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name, HF folder or .gguf (the FP32 baseline), or a "
                   "lowbit checkpoint (its source model, with its recipe)")
    p.add_argument("--recipes", default=None,
                   help="comma-separated recipes (presets, w<bits>g<group>..., recipe files) "
                        "and peer configs such as torchao:int8-weight")
    p.add_argument("--peers", default="",
                   help="comma-separated peers whose configs join the matrix: "
                        "torchao, quanto, llama.cpp (missing ones are reported, not run)")
    p.add_argument("--data", default="pydoc", help="text file, or 'pydoc' (built-in corpus)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--windows", type=int, default=32, help="number of windows")
    p.add_argument("--protocol", choices=["full", "llama.cpp"], default="full",
                   help="full: score every token; llama.cpp: the second half of each window")
    p.add_argument("--no-speed", action="store_true", help="skip the latency measurements")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", default="report", help="folder for results.json and the report")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished rows of DIR/results.json and run the rest")
    p.add_argument("--overwrite", action="store_true", help="replace DIR/results.json")
    p.add_argument("--json", action="store_true", help="print results.json instead of a table")
    add_ray_argument(p, "rows")


def run(args: argparse.Namespace) -> int:
    from lowbit.eval.bench import BenchError, BenchSettings, run_bench, split_list
    from lowbit.eval.report import markdown_table

    model, recipe = unquantized_source(args.model, args.recipes)
    if recipe is None:
        raise BenchError("no recipes to benchmark: pass --recipes, e.g. --recipes w8,w4g128")
    settings = BenchSettings(
        model=model, recipes=tuple(split_list(recipe)),
        peers=tuple(split_list(args.peers)), data=args.data, window=args.window,
        n_windows=args.windows, protocol=args.protocol, speed=not args.no_speed,
        threads=args.threads)
    results = run_bench(settings, args.report, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.json, ray=args.ray)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(markdown_table(results))
    for r in results["rows"]:
        if r["status"] != "ok":
            print(f"{r['id']}: {r['status']}: {r.get('error', '')}")
    print(f"\nreport: {args.report}/report.md, {args.report}/report.html, "
          f"{args.report}/results.json")
    return 0
