"""``lowbit quantize MODEL --recipe R -o DIR``: quantize, save, print a one-screen summary."""

from __future__ import annotations

import argparse
import time

from lowbit.cli.common import calibration_batches, set_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name (smollm2-135m, minilm-l6), HF folder or .gguf")
    p.add_argument("--recipe", "-r", default="w8", help="preset (see README), grammar or file")
    p.add_argument("--calibration", help="text file for calibration (default: built-in corpus)")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--keep", action="append", default=[],
                   help="module pattern to leave unquantized (repeatable), e.g. lm_head")
    p.add_argument("--output", "-o", required=True, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from lowbit.model import Recipe, load_model, load_tokenizer, quantize, save
    from lowbit.model.serialization import check_target

    set_threads(args.threads)
    check_target(args.output, args.overwrite)  # before the work: refuses what save would
    recipe = Recipe.parse(args.recipe)
    if args.keep:
        recipe = recipe.with_keep(*args.keep)
    t0 = time.perf_counter()
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    calib = None
    if recipe.needs_calibration:
        calib = calibration_batches(tokenizer, args.calibration, args.calibration_tokens)
    quantize(model, recipe, calib, progress=not args.quiet)
    out = save(model, args.output, overwrite=args.overwrite, tokenizer=tokenizer)
    print(f"model         {args.model} (loaded in {load_s:.1f} s)")
    for line in model.lowbit_summary.lines():
        print(line)
    print(f"saved         {out}")
    return 0
