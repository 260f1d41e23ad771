"""The fused C decode step (``runtime.native_step``) beside the runtime's torch operations.

For each recipe, SmolLM2-135M is quantized once and two float32 ``DecoderRuntime`` objects
are built on the same modules: ``native=None`` (the fused step where supported) and
``native=False`` (the torch operations). Both decode ``--new-tokens`` greedy tokens after a
``--prompt-tokens`` prompt of CPython's ``pydoc_data.topics`` text, alternating round by
round (``--rounds``) so machine noise hits both alike; printed: median tok/s of each, their
ratio, and whether the greedy tokens agree (W8A8 may drift: its activation codes amplify
float32 rounding differences).

    .venv/bin/python benchmarks/decode_step.py --recipes fp32,w8,w4g128,w8a8
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import lowbit
from lowbit.runtime import DecoderRuntime, generate


def _prompt(tokenizer, n: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)[:4])
    return torch.tensor([tokenizer.encode(text)[:n]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="fp32,w8,w4g128,w8a8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = lowbit.load_tokenizer("smollm2-135m")
    base = lowbit.load_model("smollm2-135m")
    prompt = _prompt(tokenizer, args.prompt_tokens)
    print(f"# {args.rounds} interleaved rounds of {args.new_tokens} greedy tokens after "
          f"{prompt.shape[1]} prompt tokens, {args.threads} threads, float32 runtime")
    print("| recipe | fused tok/s | torch ops tok/s | fused / torch | same tokens | step |")
    print("|---|---:|---:|---:|---|---|")
    for recipe in args.recipes.split(","):
        model = copy.deepcopy(base)
        if recipe != "fp32":
            lowbit.quantize(model, recipe, progress=False)
        runtimes = {"fused": DecoderRuntime(model, dtype=torch.float32),
                    "torch": DecoderRuntime(model, dtype=torch.float32, native=False)}
        speed = {k: [] for k in runtimes}
        tokens = {}
        generate(runtimes["fused"], prompt, 4, dtype=torch.float32)  # warm-up (and build)
        for _ in range(args.rounds):
            for key, runtime in runtimes.items():
                tokens[key], stats = generate(runtime, prompt, args.new_tokens,
                                              dtype=torch.float32)
                speed[key].append(stats.decode_tokens_per_second)
        fused, plain = (statistics.median(speed[k]) for k in ("fused", "torch"))
        same = torch.equal(tokens["fused"], tokens["torch"])
        print(f"| {recipe} | {fused:.1f} | {plain:.1f} | {fused / plain:.2f} | {same} | "
              f"{runtimes['fused'].decode_path} |", flush=True)


if __name__ == "__main__":
    main()
