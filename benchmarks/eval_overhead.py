"""What evaluating against cached baseline logits costs beside one plain forward pass.

Target (issue 4): evaluating SmolLM2 on 16k tokens (PPL + KLD + top-1 against cached
baseline log-probabilities) takes at most 1.5x one plain forward pass over the same tokens.

In one process, on the same 32 windows of 512 tokens of the pydoc corpus:
- plain: ``model(window, use_cache=False)`` for every window, nothing else;
- eval: ``eval.perplexity_windows`` with a ``KLAccumulator`` hook against the baseline's cached
  log-probabilities (NLL, KL divergence, top-1 per window), i.e. what ``evaluate`` does per
  candidate once the baseline is cached. The candidate is the FP32 model itself, so the
  forward work is identical and the difference is the evaluation's own cost.
The two are interleaved ``--repeats`` times; medians and their ratio are printed. The one-off
baseline pass (which also stores the log-probabilities) is timed and printed separately.

Run: .venv/bin/python benchmarks/eval_overhead.py [--windows 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from lowbit.data import tokens
    from lowbit.eval.compare import KLAccumulator
    from lowbit.eval.perplexity_windows import perplexity
    from lowbit.eval.scoring import baseline_logprobs
    from lowbit.model import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    ids = tokens("pydoc", load_tokenizer(args.model), count=args.window * args.windows)
    windows = ids.view(args.windows, args.window)

    def plain() -> None:
        with torch.inference_mode():
            for w in windows:
                model(w[None], use_cache=False)

    t0 = time.perf_counter()
    base_ppl, base_lp = baseline_logprobs(model, ids, window=args.window,
                                          n_windows=args.windows, protocol="full")
    baseline_s = time.perf_counter() - t0
    result = {}

    def evaluate() -> None:
        hook = KLAccumulator(base_lp)
        ppl = perplexity(model, ids, window=args.window, n_windows=args.windows,
                         logits_hook=hook)
        result.update(ppl=ppl.ppl, **hook.report().to_dict())

    plain()  # warm-up
    plain_s, eval_s = [], []
    for _ in range(args.repeats):
        for fn, times in ((plain, plain_s), (evaluate, eval_s)):
            t1 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t1)
    p, e = statistics.median(plain_s), statistics.median(eval_s)
    n = args.window * args.windows
    print(f"{args.model}, {args.windows} x {args.window} = {n} tokens, {args.threads} threads, "
          f"medians of {args.repeats} interleaved runs")
    print(f"baseline pass (once, stores bf16 log-probs): {baseline_s:7.2f} s  PPL {base_ppl:.3f}")
    print(f"plain forward passes:                        {p:7.2f} s  {plain_s}")
    print(f"eval (PPL + KLD + top-1 vs cached baseline):  {e:7.2f} s  {eval_s}")
    print(f"ratio eval / plain forward:                  {e / p:7.2f}x  (target <= 1.5x)")
    print(f"check: PPL {result['ppl']:.3f}, KLD {result['kld_mean']:.2e}, "
          f"top-1 {result['top1_agreement']:.4f} (candidate = baseline)")


if __name__ == "__main__":
    main()
