"""``lowbit generate MODEL_OR_CKPT "prompt"``: talk to a (quantized) model.

The text streams to stdout as it decodes; the closing line (speed, the loop that ran, the
kernels) goes to stderr, so ``lowbit generate ... > answer.txt`` keeps only the answer.
"""

from __future__ import annotations

import argparse
import math
import sys

from lowbit.cli.common import open_model, set_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder, bundled name, HF folder or .gguf")
    p.add_argument("prompt", help="text to continue (or, with --chat, a message to answer)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="stop after N new tokens (default 128), or earlier at end of text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 (default) is greedy; above 0 samples, hotter is more random")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only from the most likely tokens holding P of the mass")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="sampling seed: the same seed gives the same text (default 0)")
    p.add_argument("--recipe", help="quantize the model with this recipe first")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--activations", choices=["auto", "int8", "float"], default="auto",
                   help="decode loop activations: int8 per block of 32 as llama.cpp rounds "
                        "them (faster on most CPUs, KL about 0.002), float (the reference), "
                        "or auto (default: int8 where it measures faster here)")


def run(args: argparse.Namespace) -> int:
    from lowbit.runtime.text import check_options, generate

    check_options(args.prompt, args.max_new_tokens, args.temperature, args.top_p)
    set_threads(args.threads)
    model, tokenizer = open_model(args.model, args.recipe)
    _, stats = generate(model, tokenizer, args.prompt, args.max_new_tokens, chat=args.chat,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        stream=sys.stdout, activations=args.activations)
    print(flush=True)
    print(summary_line(stats), file=sys.stderr)
    return 0


def summary_line(stats) -> str:
    """One line: both rates, the loop that ran (and why not lowbit's, when it did not), and
    the linear layers per kernel."""
    decode = ("decode -" if math.isnan(stats.decode_tokens_per_second) else
              f"decode {stats.decode_tokens_per_second:.1f} tok/s")
    engine = stats.engine
    if stats.fallback:
        why = stats.fallback.split(";")[0]  # the reason, without the runtime's advice
        engine += f" (fallback: lowbit.runtime cannot run it: {why})"
    kernels = ", ".join(f"{name} x{n}" for name, n in stats.kernels.items()) or "none"
    return (f"[{stats.prompt_tokens} prompt + {stats.new_tokens} new tokens | prefill "
            f"{stats.prefill_tokens_per_second:.1f} tok/s, {decode} | {engine} | "
            f"kernels: {kernels}]")
