"""PTQ vs QAT on a small CNN trained by lowbit on scikit-learn's bundled digits images.

    python benchmarks/digits_qat.py            # about a minute on 2 cores

The CNN (2 convs + 2 linears, 41k weights) is trained in FP32 with ``lowbit.training.train``,
then every layer's weights are quantized per output channel to int8, int4, int2, ternary
and binary:

- PTQ: ``convert(prepare_qat(model, recipe))`` without training, i.e. round-to-nearest with
  min/max scales (``ptq``) and with MSE-searched clipping (``ptq-mse``);
- QAT: ``prepare_qat(model, recipe, scales="lsq")`` (learned step sizes, Esser et al. 2020),
  fine-tuned for ``--qat-steps`` steps with the straight-through estimator, then converted.

Accuracy is on a held-out 30 % split; bytes are the packed weights + scales + biases of the
converted model's layers (what ``weight_nbytes`` holds in memory). Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.model import Recipe, Scheme
from lowbit.nn import QuantizedLinear, WeightSpec
from lowbit.nn.conv import QuantizedConv2d
from lowbit.training import train
from lowbit.training.qat import convert, prepare_qat

FORMATS = ("int8", "int4", "int2", "ternary", "binary")


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(0.3 * len(y))
    test, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[test], y[test])


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def batches(train_set, steps: int, batch_size: int = 64, seed: int = 0):
    x, y = train_set
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(len(y), generator=gen)
        out += [(x[perm[i:i + batch_size]], y[perm[i:i + batch_size]])
                for i in range(0, len(y) - batch_size + 1, batch_size)]
    return out[:steps]


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, test_set) -> float:
    model.eval()
    x, y = test_set
    return float((model(x).argmax(-1) == y).float().mean())


def layer_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, QuantizedConv2d)):
            total += m.weight_nbytes() + (0 if m.bias is None else m.bias.numel() * 4)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def recipe_for(fmt: str, observer: str = "minmax") -> Recipe:
    return Recipe(f"{fmt}-channel", Scheme(WeightSpec(fmt, "channel", True, "fp32"),
                                           observer=observer), compute_dtype="fp32")


def train_fp32(train_set, steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = make_cnn()
    train(model, batches(train_set, steps), ce_loss, steps=steps, lr=3e-3, progress=False,
          schedule="cosine")
    return model.eval()


def qat(base: nn.Module, fmt: str, train_set, steps: int, lr: float) -> nn.Module:
    model = prepare_qat(copy.deepcopy(base), recipe_for(fmt, "mse"), scales="lsq")
    # BatchNorm statistics keep adapting to the quantized convolutions while training
    train(model, batches(train_set, steps, seed=1), ce_loss, steps=steps, lr=lr,
          progress=False, schedule="cosine")
    return convert(model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="FP32 training steps")
    p.add_argument("--qat-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3, help="QAT learning rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", default=",".join(FORMATS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = load_digits()
    t0 = time.perf_counter()
    base = train_fp32(train_set, args.steps)
    fp_acc, fp_bytes = accuracy(base, test_set), layer_bytes(base)
    print(f"FP32 CNN trained in {time.perf_counter() - t0:.1f} s: accuracy "
          f"{100 * fp_acc:.2f} %, {fp_bytes} bytes of conv/linear weights\n", flush=True)
    print("| weights | bytes | PTQ (min/max) | PTQ (MSE clip) | QAT (LSQ) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fp32 | {fp_bytes} | {100 * fp_acc:.2f} | | |")
    for fmt in args.formats.split(","):
        ptq = convert(prepare_qat(copy.deepcopy(base), recipe_for(fmt)))
        ptq_mse = convert(prepare_qat(copy.deepcopy(base), recipe_for(fmt, "mse")))
        t1 = time.perf_counter()
        q = qat(base, fmt, train_set, args.qat_steps, args.lr)
        dt = time.perf_counter() - t1
        print(f"| {fmt} | {layer_bytes(q)} | {100 * accuracy(ptq, test_set):.2f} | "
              f"{100 * accuracy(ptq_mse, test_set):.2f} | {100 * accuracy(q, test_set):.2f} "
              f"({dt:.0f} s) |", flush=True)
    print(f"\nper-output-channel scales, every conv and linear quantized; accuracy in % on "
          f"{len(test_set[1])} held-out digits; command: python benchmarks/digits_qat.py "
          f"--steps {args.steps} --qat-steps {args.qat_steps} --lr {args.lr}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
