"""Accuracy vs bytes on the digits CNN: prune only, quantize only, and prune -> quantize ->
fine-tune (Han et al., 2016, "Deep Compression", in lowbit's pieces).

    python benchmarks/prune_quant.py           # about two minutes on 2 cores

Every variant starts from the same FP32 CNN of ``digits_qat.py``, is measured right after
compression ("as is") and after ``--steps`` steps of fine-tuning with the pruning masks
kept (``lowbit.training.train(masks=...)``; quantized variants train with learned step
sizes, then ``convert``). Bytes count the conv and linear layers: dense FP32, or packed
codes + scales for quantized layers (real, from ``weight_nbytes``); pruned layers are
counted in a sparse layout (``lowbit.training.sparse_nbytes``: a 1-bit map for unstructured
sparsity, 2-bit indices per kept value for 2:4), an estimate, since lowbit stores weights
dense. Biases are included everywhere. Under 2:4 the first convolution (9 inputs per
output channel) stays dense.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from digits_qat import accuracy, batches, ce_loss, layer_bytes, load_digits, recipe_for
from digits_qat import train_fp32 as train_base
from torch import nn

from lowbit.nn import QuantizedLinear
from lowbit.nn.conv import QuantizedConv2d
from lowbit.training import prune, sparse_nbytes, train
from lowbit.training.qat import convert, prepare_qat

VARIANTS = [  # name, pruning pattern, sparsity, weight format
    ("prune 50 %", "unstructured", 0.5, None),
    ("prune 75 %", "unstructured", 0.75, None),
    ("prune 2:4", "2:4", 0.5, None),
    ("int8", None, 0.0, "int8"),
    ("int4", None, 0.0, "int4"),
    ("2:4 + int8", "2:4", 0.5, "int8"),
    ("2:4 + int4", "2:4", 0.5, "int4"),
    ("75 % + int4", "unstructured", 0.75, "int4"),
    ("75 % + int2", "unstructured", 0.75, "int2"),
]


def sparse_bytes(model: nn.Module, masks, bits: float) -> float:
    """Sparse-layout bytes of the masked layers, + scales and biases; dense for the rest."""
    total = 0.0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d, QuantizedLinear, QuantizedConv2d)):
            continue
        bias = 0 if m.bias is None else m.bias.numel() * 4
        scales = 0
        if isinstance(m, (QuantizedLinear, QuantizedConv2d)):
            qp = m.packed_weight().qparams
            scales = qp.scale.numel() * qp.scale.element_size()
        if name not in masks.masks:  # kept dense
            total += m.weight_nbytes() + bias if scales else layer_bytes(m)
            continue
        total += sparse_nbytes(masks.masks[name], bits, masks.pattern) + scales + bias
    return total


def compress(base: nn.Module, pattern, sparsity, fmt, train_set, steps: int, lr: float):
    """(as-is model, fine-tuned model, bytes) for one variant."""
    model = copy.deepcopy(base)
    # the first conv has 9 inputs per output channel, not a multiple of 4: dense under 2:4
    skip = ("0",) if pattern == "2:4" else ()
    masks = prune(model, sparsity, pattern, skip=skip) if pattern else None
    if fmt:
        prepare_qat(model, recipe_for(fmt, "mse"), scales="lsq")
    as_is = convert(copy.deepcopy(model)) if fmt else copy.deepcopy(model)
    train(model, batches(train_set, steps, seed=2), ce_loss, steps=steps, lr=lr, masks=masks,
          progress=False, schedule="cosine")
    tuned = convert(model) if fmt else model
    bits = 32 if fmt is None else int(fmt.removeprefix("int"))
    size = sparse_bytes(tuned, masks, bits) if masks else layer_bytes(tuned)
    return as_is, tuned, size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per variant")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = load_digits()
    base = train_base(train_set, args.base_steps)
    fp_bytes = layer_bytes(base)
    print("| variant | bytes | x smaller | accuracy as is | accuracy fine-tuned |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fp32 dense | {fp_bytes} | 1.0 | {100 * accuracy(base, test_set):.2f} | |")
    for name, pattern, sparsity, fmt in VARIANTS:
        as_is, tuned, size = compress(base, pattern, sparsity, fmt, train_set, args.steps,
                                      args.lr)
        print(f"| {name} | {math.ceil(size)} | {fp_bytes / size:.1f} | "
              f"{100 * accuracy(as_is, test_set):.2f} | {100 * accuracy(tuned, test_set):.2f} |",
              flush=True)
    print(f"\naccuracy in % on {len(test_set[1])} held-out digits; per-output-channel scales; "
          f"command: python benchmarks/prune_quant.py --base-steps {args.base_steps} "
          f"--steps {args.steps} --lr {args.lr}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
