"""SmolLM2-135M at 2-3 bits: how much of the PTQ perplexity gap does QAT with distillation
recover in a fixed time budget on the CPU?

    python benchmarks/smollm2_qat.py --recipe w3g64 --minutes 30 --threads 2

A 5-step check (``--steps 5 --eval-windows 2 --train-tokens 2048``, default settings,
``--train scales``) took PPL 91.4 (PTQ) to 39.5 (FP32: 14.2), 67 % of the gap, in 5.4 min
on 2 shared cores; ``--train all --lr 1e-5 --scale-lr 1e-4`` reached 67.2 (31 %) in 5 steps.

Steps: perplexity of the FP32 model and of round-to-nearest PTQ (``lowbit.quantize``) on
the evaluation slice of the pydoc corpus (tokens 0..); then ``prepare_qat`` with learned
step sizes (LSQ, Esser et al. 2020) and training on KL distillation from the FP32 model
(Hinton et al. 2015; LLM-QAT, Liu et al. 2023) on the calibration slice (tokens 20000..,
disjoint from evaluation), until ``--steps`` or ``--minutes`` run out; then ``convert`` to
the same packed modules PTQ makes and the perplexity again. Reported: the share of the gap
recovered, ``(ppl_ptq - ppl_qat) / (ppl_ptq - ppl_fp32)``; the goal is >= 0.5 in 30 min.
``--train scales`` or ``--train lora`` are the parameter-efficient modes (no optimizer
state for the full weights). A benchmark, not a test: it takes as long as you let it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from lowbit.data import CALIBRATION_OFFSET, text, tokens
from lowbit.eval import perplexity
from lowbit.model import Recipe, load_model, load_tokenizer, quantize
from lowbit.training import causal_lm_distiller, qat_optimizer, train
from lowbit.training.qat import QATConfig, convert, prepare_qat


def ppl(model, ids, args) -> float:
    return perplexity(model, ids, window=args.window, n_windows=args.eval_windows).ppl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w3g64")
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    p.add_argument("--lr", type=float, default=1e-3, help="1e-5 suits --train all")
    p.add_argument("--scale-lr", type=float, default=1e-3)
    p.add_argument("--train", choices=["all", "scales", "lora"], default="scales")
    p.add_argument("--scales", choices=["minmax", "lsq", "lsq+"], default="lsq")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-tokens", type=int, default=262144)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe.parse(args.recipe)
    t0 = time.perf_counter()
    fp = load_model(args.model)
    fp.config.use_cache = False
    tok = load_tokenizer(args.model)
    eval_ids = tokens("pydoc", tok, count=args.window * args.eval_windows)
    data = text("pydoc", tok, tokens=args.train_tokens, seq_len=args.seq_len,
                offset=CALIBRATION_OFFSET)
    ppl_fp = ppl(fp, eval_ids, args)
    print(f"FP32            PPL {ppl_fp:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    ptq = quantize(copy.deepcopy(fp), recipe, progress=False)
    ppl_ptq = ppl(ptq, eval_ids, args)
    del ptq
    print(f"PTQ {recipe.name:<11} PPL {ppl_ptq:.3f}", flush=True)

    student = prepare_qat(copy.deepcopy(fp), recipe,
                          QATConfig(scales=args.scales, train=args.train))
    opt = qat_optimizer(student, args.lr, args.scale_lr)
    result = train(student, data, causal_lm_distiller(fp, args.temperature), steps=args.steps,
                   optimizer=opt, checkpoint_dir=args.checkpoint_dir,
                   checkpoint_every=200, max_seconds=60 * args.minutes,
                   meta={"recipe": recipe.to_dict()})
    convert(student)
    ppl_qat = ppl(student, eval_ids, args)
    gap = ppl_ptq - ppl_fp
    recovered = (ppl_ptq - ppl_qat) / gap if gap > 0 else float("nan")
    print(f"QAT {recipe.name:<11} PPL {ppl_qat:.3f} after {result.steps} steps in "
          f"{result.seconds / 60:.1f} min ({result.seconds / max(1, result.steps):.2f} s/step); "
          f"KD loss {result.losses[0]:.4f} -> {result.last_loss:.4f}")
    print(f"gap recovered   {100 * recovered:.1f} %  (goal: >= 50 % in 30 min on 2 cores)")
    print(f"command         python benchmarks/smollm2_qat.py --recipe {args.recipe} "
          f"--minutes {args.minutes} --steps {args.steps} --train {args.train} "
          f"--scales {args.scales} --lr {args.lr} --scale-lr {args.scale_lr} "
          f"--threads {args.threads}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"recipe": recipe.name, "ppl_fp32": ppl_fp, "ppl_ptq": ppl_ptq,
                       "ppl_qat": ppl_qat, "recovered": recovered, "steps": result.steps,
                       "seconds": result.seconds, "losses": result.losses}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
