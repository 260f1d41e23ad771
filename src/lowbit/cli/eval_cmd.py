"""``lowbit eval MODEL_OR_DIR [--baseline MODEL] [--json]``: quality, size and speed."""

from __future__ import annotations

import argparse
import json

from lowbit.cli.common import open_model, set_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder, bundled name, HF folder or .gguf")
    p.add_argument("--recipe", help="quantize the model with this recipe before evaluating")
    p.add_argument("--baseline", help="model to compare against (KL divergence, top-1, ΔPPL)")
    p.add_argument("--data", default="pydoc", help="text file, or a built-in text: 'pydoc' "
                   "(in-domain), 'idle-news' or 'email' (held out from calibration)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--windows", type=int, default=32, help="number of windows")
    p.add_argument("--protocol", choices=["full", "llama.cpp"], default="full",
                   help="full: score every token; llama.cpp: the second half of each window")
    p.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    p.add_argument("--stream", action="store_true", help="evaluate block by block, reading "
                   "one block at a time (automatic when the model does not fit in memory)")
    p.add_argument("--max-memory", help="memory the evaluation may use, e.g. 8GiB (default: "
                   "what the machine has available)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from lowbit.eval import evaluate

    set_threads(args.threads)
    if _streams(args):
        from lowbit.eval.streamed import streamed_evaluate

        result = streamed_evaluate(args.model, baseline=args.baseline, data=args.data,
                                   window=args.window, n_windows=args.windows,
                                   protocol=args.protocol, progress=not args.json)
        result["model"] = args.model
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_result(result)
        return 0
    model, tokenizer = open_model(args.model, args.recipe, progress=not args.json)
    baseline = open_model(args.baseline)[0] if args.baseline else None
    result = evaluate(model, tokenizer, baseline=baseline, data=args.data, window=args.window,
                      n_windows=args.windows, protocol=args.protocol, speed=not args.no_speed)
    result["model"] = args.model
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_result(result)
    return 0


def _streams(args) -> bool:
    """``--stream``, or a model (or baseline) whose weights do not fit the memory cap."""
    import sys

    from lowbit.errors import LowbitError
    from lowbit.model.loaders import resolve_spec
    from lowbit.model.shards import TensorFiles
    from lowbit.model.stream_memory import (
        available_memory,
        format_size,
        parse_size,
        resident_bytes,
    )

    if args.stream and args.recipe:
        raise LowbitError("--stream evaluates a saved checkpoint as it is; quantize it first "
                          "(lowbit quantize ... -o DIR) instead of passing --recipe")
    if args.stream or args.recipe:
        return args.stream
    cap = parse_size(args.max_memory) if args.max_memory else available_memory()
    need = resident_bytes()
    for spec in [args.model] + ([args.baseline] if args.baseline else []):
        kind, path = resolve_spec(spec)
        if kind not in ("hf", "lowbit"):
            return False
        files = TensorFiles(path, LowbitError)
        need += int(1.2 * sum(files.nbytes(n, as_float32=kind == "hf") for n in files.names()))
    if need <= cap:
        return False
    print(f"lowbit: the weights need about {format_size(need)} in memory, more than "
          f"{format_size(cap)}: evaluating block by block", file=sys.stderr)
    return True


def print_result(r: dict) -> None:
    print(f"model            {r['model']}")
    if r.get("task") == "embeddings":  # an encoder: lowbit.eval.embeddings
        from lowbit.eval.embeddings import format_embedding_result

        print("\n".join(format_embedding_result(r)))
        return
    print(f"perplexity       {r['ppl']:.3f}  ({r['protocol']}, {r['n_windows']}x{r['window']} "
          f"tokens of {r['data']})")
    if "baseline_ppl" in r:
        print(f"baseline         {r['baseline_ppl']:.3f}  (ΔPPL {r['delta_ppl_pct']:+.2f}%)")
        print(f"KL divergence    mean {r['kld_mean']:.4f}  p99 {r['kld_p99']:.4f}")
        print(f"top-1 agreement  {100 * r['top1_agreement']:.1f}%")
    print(f"size             {r['bytes'] / 1e6:.1f} MB in memory; linear weights "
          f"{r['linear_bytes'] / 1e6:.1f} MB = {r['bits_per_weight']:.2f} bits/weight")
    if "prefill_s" in r:
        print(f"speed            prefill {r['prefill_s'] * 1e3:.0f} ms / 512 tokens, decode "
              f"{r['decode_tok_s']:.1f} tok/s ({r['engine']})")
    kernels = ", ".join(f"{k} x{n}" for k, n in r["kernels"].items())
    print(f"kernels          {kernels}")
