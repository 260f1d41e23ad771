"""Quantize + pack throughput of lowbit's format layer beside torch's own quantizer.

Measures, on a 4096x4096 float32 tensor, in one process, medians of N runs after a warm-up:
- lowbit int8 per-channel (absmax scale computed from the data, quantize, pack = bytes);
- torch.quantize_per_channel with the same scales (scales computed the same way, timed
  inside, so both sides do the same work), and torch's call alone (scales given);
- lowbit int4 group-128 asymmetric (min/max, zero-point, quantize, pack two codes a byte).
Prints GB/s of input processed and the ratio lowbit / torch (target: int8 within 1.5x).

Run: .venv/bin/python benchmarks/formats.py [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lowbit.formats import compute_qparams, get_format, pack, quantize


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lowbit_int8_channel(w: torch.Tensor) -> torch.Tensor:
    qp = compute_qparams(w, "int8", "channel")
    return pack(get_format("int8").to_bits(quantize(w, qp)), 8)


def lowbit_int4_group128(w: torch.Tensor) -> torch.Tensor:
    qp = compute_qparams(w, "uint4", "group:128", symmetric=False)
    return pack(get_format("uint4").to_bits(quantize(w, qp)), 4)


def torch_int8_channel_with_scales(w: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(w, dim=1)
    scale = torch.maximum(lo.abs(), hi.abs()) / 127
    zero = torch.zeros_like(scale, dtype=torch.int64)
    return torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    gb = w.numel() * 4 / 1e9
    lo, hi = torch.aminmax(w, dim=1)
    scale = (torch.maximum(lo.abs(), hi.abs()) / 127).double()
    zero = torch.zeros_like(scale, dtype=torch.int64)

    rows = {
        "lowbit int8 per-channel (scales + quantize + pack)": lambda: lowbit_int8_channel(w),
        "torch.quantize_per_channel (scales + quantize)": lambda: torch_int8_channel_with_scales(w),
        "torch.quantize_per_channel (scales given)": lambda: torch.quantize_per_channel(
            w, scale, zero, 0, torch.qint8),
        "lowbit int4 group-128 asym (scales + quantize + pack)": lambda: lowbit_int4_group128(w),
    }
    times = {name: median_seconds(fn, args.repeats) for name, fn in rows.items()}
    print(f"4096x4096 fp32 ({gb * 1e3:.0f} MB), {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'path':55s} {'ms':>8s} {'GB/s':>6s}")
    for name, t in times.items():
        print(f"{name:55s} {t * 1e3:8.1f} {gb / t:6.2f}")
    ours = times["lowbit int8 per-channel (scales + quantize + pack)"]
    same_work = times["torch.quantize_per_channel (scales + quantize)"]
    given = times["torch.quantize_per_channel (scales given)"]
    print(f"ratio lowbit int8 / torch (same work): {ours / same_work:.2f}x  (target <= 1.5x)")
    print(f"ratio lowbit int8 / torch (torch given its scales): {ours / given:.2f}x")
    packed = lowbit_int4_group128(w)
    print(f"int4 g128 packed bytes: {packed.numel() * packed.element_size():,} "
          f"(= {packed.numel() * packed.element_size() / (w.numel() * 4):.3f}x fp32, "
          f"codes only; scales and zero-points add {w.numel() // 128 * 5:,} bytes)")


if __name__ == "__main__":
    main()
