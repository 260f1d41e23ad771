"""``lowbit quantize MODEL --recipe R -o DIR``: quantize, save, print a one-screen summary.

A Hugging Face folder that does not fit in ``--max-memory`` (default: what the machine has
available) is quantized one block at a time (``lowbit.quantize_checkpoint``), as ``--stream``
forces; ``--resume`` continues such a run that was interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time

from lowbit.cli.common import (
    CALIBRATION_WINDOW,
    add_ray_argument,
    calibration_batches,
    set_threads,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name (smollm2-135m, minilm-l6), HF folder or .gguf")
    p.add_argument("--recipe", "-r", default="w8", help="preset (see README), grammar or file")
    p.add_argument("--calibration", help="calibration text: a file, a built-in name "
                   "(default, pydoc, docstrings, stdlib-code), 'generated' (sampled from the "
                   "model) or a mix such as default+my.txt@0.25 (a quarter of the windows from "
                   "my.txt); default: the built-in mix")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--keep", action="append", default=[],
                   help="module pattern to leave unquantized (repeatable), e.g. lm_head")
    p.add_argument("--output", "-o", required=True, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--max-memory", help="memory the run may use, e.g. 8GiB (default: what the "
                   "machine has available); a model that does not fit is streamed")
    p.add_argument("--stream", action="store_true", help="quantize one block at a time, "
                   "reading the weights from the files (sharded output)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted streamed "
                   "run into the same --output")
    add_ray_argument(p, "auto:<bpw> recipe's layer scoring")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from lowbit.model import Recipe
    from lowbit.model.serialization import check_target

    set_threads(args.threads)
    check_target(args.output, args.overwrite)  # before the work: refuses what save would
    recipe = Recipe.parse(args.recipe)
    if args.keep:
        recipe = recipe.with_keep(*args.keep)
    if recipe.needs_calibration:
        _check_calibration_tokens(args.calibration_tokens)
    if args.ray:
        _score_on_ray(recipe, args.ray)
    folder, cap = _streamed_source(args, recipe)
    if folder is not None:
        return _run_streamed(args, recipe, folder, cap)
    return _run_in_memory(args, recipe)


def _check_calibration_tokens(tokens: int) -> None:
    """``--calibration-tokens`` must fill at least one calibration window."""
    if tokens < CALIBRATION_WINDOW:
        from lowbit.errors import LowbitError

        raise LowbitError(f"--calibration-tokens {tokens} is less than one calibration window "
                          f"({CALIBRATION_WINDOW} tokens); use {CALIBRATION_WINDOW} or more")


def _score_on_ray(recipe, address: str) -> None:
    """``--ray``: only an ``auto:<bpw>`` recipe has independent cells (its layer scoring,
    which reads ``$LOWBIT_RAY`` in this process)."""
    import os

    from lowbit.errors import LowbitError
    from lowbit.model.distributed import ENV
    from lowbit.model.recipe import GGUF_AUTO, is_auto

    if recipe.name.startswith(GGUF_AUTO):
        raise LowbitError(f"{recipe.name} scores its layers in this process (--ray distributes "
                          "auto:<bpw> recipes only): drop --ray")
    if not is_auto(recipe):
        raise LowbitError(f"--ray distributes the layer scoring of an auto:<bpw> recipe; "
                          f"{recipe.name} has none: drop --ray, or use e.g. -r auto:4-gptq")
    os.environ[ENV] = address


def _streamed_source(args, recipe):
    """(HF folder, cap) when the run streams: ``--stream``/``--resume``, or a model that
    does not fit the cap; (None, cap) otherwise."""
    from lowbit.errors import LowbitError
    from lowbit.model.loaders import resolve_spec
    from lowbit.model.stream_memory import available_memory, folder_need, format_size, parse_size

    cap = parse_size(args.max_memory) if args.max_memory else available_memory()
    kind, path = resolve_spec(args.model)
    if args.stream or args.resume:
        if kind != "hf":
            raise LowbitError(f"--stream reads a Hugging Face folder (config.json + safetensors "
                              f"shards); {args.model} is a {kind} model: drop --stream")
        return path, cap
    if kind != "hf":
        return None, cap
    tokens = args.calibration_tokens if recipe.needs_calibration else 0
    need, weights = folder_need(path, tokens)
    if need <= cap:
        return None, cap
    print(f"lowbit: {args.model} needs about {format_size(need)} in memory ({format_size(weights)}"
          f" of FP32 weights), more than --max-memory {format_size(cap)}: quantizing one block "
          "at a time (streaming)", file=sys.stderr)
    return path, cap


def _run_streamed(args, recipe, folder, cap) -> int:
    from lowbit.model import load_tokenizer
    from lowbit.model.stream_quantize import quantize_checkpoint

    tokenizer = load_tokenizer(args.model)
    calib = None
    if recipe.needs_calibration:
        calib = calibration_batches(tokenizer, args.calibration, args.calibration_tokens)
    done = quantize_checkpoint(folder, recipe, args.output, calib, overwrite=args.overwrite,
                               resume=args.resume, max_memory=cap, tokenizer=tokenizer,
                               progress=not args.quiet)
    print(f"model         {args.model} (streamed: {done.units} parts, one at a time"
          f"{f'; {done.resumed} finished by the interrupted run' if done.resumed else ''})")
    for line in done.summary.lines():
        print(line)
    print(f"saved         {done.path}")
    return 0


def _run_in_memory(args, recipe) -> int:
    from lowbit.model import load_model, load_tokenizer, quantize, save

    t0 = time.perf_counter()
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    calib = None
    if recipe.needs_calibration:
        calib = calibration_batches(tokenizer, args.calibration, args.calibration_tokens,
                                    model=model)
    quantize(model, recipe, calib, progress=not args.quiet)
    cal = None if calib is None else {"text": args.calibration or "default",
                                      "tokens": sum(int(b.numel()) for b in calib)}
    model.lowbit_calibration_text = cal  # recorded in the manifest (``calibration``)
    out = save(model, args.output, overwrite=args.overwrite, tokenizer=tokenizer)
    print(f"model         {args.model} (loaded in {load_s:.1f} s)")
    for line in model.lowbit_summary.lines():
        print(line)
    if cal is not None:
        print(f"calibration   {cal['text']} ({cal['tokens']} tokens)")
    print(f"saved         {out}")
    return 0
