"""``lowbit demo``: the main job on the bundled default model, one screen.

Loads SmolLM2-135M (FP32, dequantized from its GGUF), quantizes a copy with each recipe,
and prints, beside the FP32 baseline: perplexity, ΔPPL, KL divergence, top-1 agreement,
bits per weight, memory, prefill and decode speed, and the kernel that ran. Saves the last
recipe's checkpoint so ``lowbit eval DIR`` can reopen it.
"""

from __future__ import annotations

import argparse
import copy

from lowbit.cli.common import set_threads

COLUMNS = ("recipe", "PPL", "ΔPPL", "KLD", "top-1", "bits/w", "MB", "prefill", "decode",
           "kernel")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--recipes", default="bf16,w8,w4g128,w8a8",
                   help="comma-separated recipes (see README)")
    p.add_argument("--windows", type=int, default=8, help="windows of 512 tokens scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", "-o", default="out/demo", help="checkpoint of the last recipe")
    p.add_argument("--no-speed", action="store_true")


def _row(name: str, r: dict, reference: bool = False) -> tuple[str, ...]:
    """One table row; the reference (FP32) row shows no divergence from itself."""
    kernels = max(r["kernels"].items(), key=lambda kv: kv[1])[0] if r["kernels"] else "-"
    speed = ("-", "-") if "prefill_s" not in r else (
        f"{r['prefill_s'] * 1e3:.0f} ms", f"{r['decode_tok_s']:.1f} tok/s")
    quality = ("-", "-", "-") if reference else (
        f"{r['delta_ppl_pct']:+.2f}%", f"{r['kld_mean']:.4f}", f"{100 * r['top1_agreement']:.1f}%")
    return (name, f"{r['ppl']:.3f}", *quality, f"{r['bits_per_weight']:.2f}",
            f"{r['bytes'] / 1e6:.0f}", *speed, kernels)


# widths of the columns after the recipe's: room for the values _row formats
_WIDTHS = (7, 8, 6, 6, 6, 4, 9, 11)


def _printer(names: list[str]):
    """Print the header now and each row as it comes, aligned: one table, printed once."""
    widths = [max(len(n) for n in [COLUMNS[0], *names]), *_WIDTHS, 0]
    widths = [max(w, len(c)) for w, c in zip(widths, COLUMNS, strict=True)]

    def line(cells: tuple[str, ...]) -> None:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip(),
              flush=True)

    line(COLUMNS)
    print("  ".join("-" * w for w in widths))
    return line


def run(args: argparse.Namespace) -> int:
    from lowbit.eval import evaluate
    from lowbit.model import Recipe, load_model, load_tokenizer, quantize, save

    set_threads(args.threads)
    recipes = [Recipe.parse(r) for r in args.recipes.split(",") if r.strip()]
    from lowbit.kernels import cpu_features

    print(f"lowbit demo: {args.model}, {args.windows} windows x 512 tokens of the built-in "
          f"corpus, {args.threads} threads; CPU: {cpu_features().describe()}", flush=True)
    base = load_model(args.model)
    tok = load_tokenizer(args.model)
    speed = not args.no_speed
    print_row = _printer(["fp32", *(r.name for r in recipes)])
    base_result = evaluate(base, tok, baseline=base, n_windows=args.windows, speed=speed)
    print_row(_row("fp32", base_result, reference=True))
    model = None
    for recipe in recipes:
        model = copy.deepcopy(base)
        calib = None
        if recipe.needs_calibration:
            from lowbit.cli.common import calibration_batches

            calib = calibration_batches(tok, None, tokens=8192)
        quantize(model, recipe, calib, progress=False)
        r = evaluate(model, tok, baseline=base, n_windows=args.windows, speed=speed)
        print_row(_row(recipe.name, r))
    if model is not None and args.output:
        out = save(model, args.output, overwrite=True, tokenizer=tok)
        print(f"\nsaved {recipes[-1].name} checkpoint to {out}; reopen it with "
              f"`lowbit eval {out} --baseline {args.model}`")
    print("Note: SmolLM2's weights were stored as Q4_1 (4-bit, groups of 32, asymmetric), so "
          "w4g32 re-quantization is nearly free on it; w4g128 is the honest 4-bit figure.")
    return 0
