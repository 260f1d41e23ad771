"""``lowbit sensitivity MODEL --recipe R [--per layer|block]``: which layers quantization hurts."""

from __future__ import annotations

import argparse
import json

from lowbit.cli.common import add_ray_argument, set_threads, unquantized_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name, HF folder or .gguf (unquantized), or a lowbit "
                   "checkpoint (its source model, with its recipe)")
    p.add_argument("--recipe", help="recipe whose scheme each layer gets (default: the "
                   "checkpoint's)")
    p.add_argument("--per", choices=["layer", "block"], default="layer",
                   help="quantize one layer at a time, or every layer of one block")
    p.add_argument("--data", default="pydoc", help="text file, or 'pydoc' (built-in corpus)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--windows", type=int, default=2, help="number of windows scored per unit")
    p.add_argument("--protocol", choices=["full", "llama.cpp"], default="full")
    p.add_argument("--top", type=int, default=20, help="rows of the ranked table to print")
    p.add_argument("--heatmap", default="sensitivity.png",
                   help="PNG heat map (layers x module types); '' for none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print every row as JSON")
    add_ray_argument(p, "units (layers or blocks)")


def run(args: argparse.Namespace) -> int:
    from lowbit.eval.sensitivity import sensitivity
    from lowbit.model import load_model, load_tokenizer

    set_threads(args.threads)
    spec, recipe = unquantized_source(args.model, args.recipe)
    if recipe is None:
        from lowbit.model import RecipeError

        raise RecipeError("sensitivity needs a recipe: pass --recipe (e.g. --recipe w4g128)")
    model = load_model(spec)
    tokenizer = load_tokenizer(spec)
    result = sensitivity(model, tokenizer, recipe, per=args.per, data=args.data,
                         window=args.window, n_windows=args.windows, protocol=args.protocol,
                         progress=not args.json, ray=args.ray)
    heatmap = None
    if args.heatmap:
        from lowbit.eval.report import plot_sensitivity_heatmap

        heatmap = plot_sensitivity_heatmap(result, args.heatmap)
    if args.json:
        out = result.to_dict()
        out["heatmap"] = None if heatmap is None else str(heatmap)
        print(json.dumps(out, indent=2))
        return 0
    print(f"sensitivity of {args.model} to {result.recipe}, one {args.per} at a time: KL "
          f"divergence vs the unquantized model on {result.n_windows}x{result.window} tokens "
          f"of {result.data} (baseline PPL {result.baseline_ppl:.3f}, {result.seconds:.0f} s)")
    for note in result.notes:
        print(f"note: {note}")
    print(result.table(args.top or None))
    if heatmap is not None:
        print(f"heat map: {heatmap}")
    return 0
