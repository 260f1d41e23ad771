"""``lowbit qat MODEL --recipe R --data FILE --steps N -o DIR``: quantization-aware training.

Fake-quantizes the model with the recipe (``lowbit.training.qat.prepare_qat``), trains it to
match the full-precision model's logits (KL distillation, the default) or on next-token
cross-entropy, then converts to packed quantized modules and saves a checkpoint that
``lowbit eval`` and ``lowbit.load`` read. Progress shows the loss and the time per step;
checkpoints go to ``--checkpoint-dir`` (default ``OUTPUT.ckpt``) every
``--checkpoint-every`` steps, and ``--resume DIR`` continues from one.
"""

from __future__ import annotations

import argparse
import copy
import time

from lowbit.cli.common import set_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name (smollm2-135m), HF folder or .gguf")
    p.add_argument("--recipe", "-r", default="w4g32", help="preset, grammar or recipe file")
    p.add_argument("--data", default="pydoc", help="training text file, or 'pydoc'")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 1e-5 for --train all, 1e-3 otherwise)")
    p.add_argument("--scale-lr", type=float, default=None,
                   help="learning rate of the learned scales (default 1e-3)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--offset", type=int, default=None,
                   help="first training token (default: 20000 for pydoc, which evaluation "
                        "does not use; 0 for a file)")
    p.add_argument("--loss", choices=["kd", "ce"], default="kd",
                   help="kd: KL to the full-precision model's logits; ce: next-token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--scales", choices=["minmax", "lsq", "lsq+"], default="lsq",
                   help="fixed min/max scales or learned ones (LSQ / LSQ+)")
    p.add_argument("--train", choices=["all", "scales", "lora"], default="all",
                   help="what trains: every weight, only the scales, or low-rank adapters")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--keep", action="append", default=[],
                   help="module pattern to leave unquantized (repeatable), e.g. lm_head")
    p.add_argument("--checkpoint-dir", help="where training checkpoints go (OUTPUT.ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", metavar="DIR", help="continue from this checkpoint folder")
    p.add_argument("--output", "-o", required=True, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def training_batches(tokenizer, args: argparse.Namespace):
    from lowbit.data import CALIBRATION_OFFSET, text

    offset = args.offset if args.offset is not None else (
        CALIBRATION_OFFSET if args.data == "pydoc" else 0)
    tokens = args.steps * args.seq_len * args.batch_size
    # as many distinct windows as the text has (the loop cycles them when the run is longer)
    return text(args.data, tokenizer, tokens=tokens, seq_len=args.seq_len, offset=offset,
                batch_size=args.batch_size)


def run(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    from lowbit.model import Recipe, load_model, load_tokenizer, save
    from lowbit.model.serialization import check_target
    from lowbit.training import causal_lm_distiller, causal_lm_loss, qat_optimizer, train
    from lowbit.training.qat import QATConfig, convert, prepare_qat

    set_threads(args.threads)
    check_target(args.output, args.overwrite)  # before training: refuses what save would
    recipe = Recipe.parse(args.recipe)
    if args.keep:
        recipe = recipe.with_keep(*args.keep)
    config = QATConfig(scales=args.scales, train=args.train, lora_rank=args.lora_rank)
    lr = args.lr if args.lr is not None else (1e-5 if args.train == "all" else 1e-3)
    t0 = time.perf_counter()
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if hasattr(model, "config"):
        model.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short text: fewer windows, cycled
        data = training_batches(tokenizer, args)
    teacher = copy.deepcopy(model).eval() if args.loss == "kd" else None
    prepare_qat(model, recipe, config)
    loss_fn = (causal_lm_distiller(teacher, args.temperature) if teacher is not None
               else causal_lm_loss)
    ckpt = Path(args.resume or args.checkpoint_dir or f"{args.output}.ckpt")
    meta = {"model": args.model, "recipe": recipe.to_dict(), "qat": config.to_dict(),
            "loss": args.loss, "temperature": args.temperature, "seq_len": args.seq_len,
            "batch_size": args.batch_size}
    print(f"model         {args.model} (loaded in {time.perf_counter() - t0:.1f} s)")
    print(f"recipe        {recipe.name}: {recipe.describe()}")
    print(f"training      {args.steps} steps of {args.batch_size}x{args.seq_len} tokens, "
          f"loss {args.loss}, train {args.train}, scales {args.scales}, lr {lr:g}, "
          f"scale lr {args.scale_lr or 1e-3:g}")
    scale_lr = args.scale_lr or 1e-3
    optimizer = qat_optimizer(model, lr, scale_lr)
    result = train(model, data, loss_fn, steps=args.steps, optimizer=optimizer,
                   checkpoint_dir=ckpt,
                   checkpoint_every=args.checkpoint_every, resume=bool(args.resume),
                   meta=meta, progress=not args.quiet, seed=args.seed)
    del teacher
    convert(model)
    out = save(model, args.output, overwrite=args.overwrite, tokenizer=tokenizer)
    first = result.losses[0] if result.losses else float("nan")
    per_step = result.seconds / max(1, args.steps - result.resumed_from)
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    print(f"loss          {first:.4f} -> {result.last_loss:.4f} "
          f"({result.seconds:.0f} s, {per_step:.2f} s/step{resumed})")
    for line in model.lowbit_summary.lines()[1:]:
        print(line)
    print(f"checkpoints   {ckpt}")
    print(f"saved         {out}  (evaluate: lowbit eval {out} --baseline {args.model})")
    return 0
