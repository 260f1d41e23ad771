"""``lowbit explain FORMAT -- VALUES...``: what a format does to some numbers, bit by bit.

For each value: the bits of its code (sign / exponent / mantissa for floats), the scale and
zero-point chosen, the code, the value it decodes to, and the error.
"""

from __future__ import annotations

import argparse
import json

import torch

from lowbit.formats import (
    FormatError,
    Granularity,
    dequantize,
    error_report,
    get_format,
    quantize,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", help="format name (see `lowbit formats`), e.g. int8, fp8_e4m3, nf4")
    p.add_argument("values", nargs="+", type=float, help="numbers to quantize (put -- before them)")
    p.add_argument("--granularity", default="tensor",
                   help="tensor (default) or group:N (one scale per N consecutive values)")
    p.add_argument("--asymmetric", action="store_true",
                   help="min/max with an integer zero-point (integer formats)")
    p.add_argument("--observer", default=None,
                   help="range estimator: minmax, absmax, percentile, meanstd, mse, kl "
                        "(default: absmax when symmetric, minmax when asymmetric)")
    p.add_argument("--scale-dtype", default="fp32", choices=["fp32", "fp16", "bf16", "e8m0"])
    p.add_argument("--no-scale", action="store_true",
                   help="encode the values as they are (scale 1), e.g. to see raw FP8 bits")
    p.add_argument("--json", action="store_true", help="machine-readable output (key `codes`)")


def _bit_string(fmt, code: torch.Tensor) -> str:
    pattern = int(fmt.to_bits(code.reshape(1))[0]) if fmt.bits <= 8 else int(code) & 0xFFFF
    bits = format(pattern, f"0{fmt.bits}b")
    exp_bits = getattr(fmt, "exp_bits", None)
    if fmt.kind == "float" and exp_bits is not None:
        return f"{bits[0]} {bits[1:1 + exp_bits]} {bits[1 + exp_bits:]}".rstrip()
    return bits


def _qparams(x: torch.Tensor, fmt, args: argparse.Namespace):
    from lowbit.formats import qparams_from_range

    granularity = Granularity.parse(args.granularity)
    if granularity.kind not in ("tensor", "group"):
        raise FormatError(
            "explain takes a flat list of values: use --granularity tensor or group:N")
    symmetric = not args.asymmetric
    if args.no_scale:
        one = torch.tensor(fmt.max_value)
        return qparams_from_range(-one, one, fmt, granularity, symmetric=True)
    name = args.observer or ("absmax" if symmetric else "minmax")
    from lowbit.observers import get_observer

    observer = get_observer(name, fmt, granularity, symmetric=symmetric,
                            scale_dtype=args.scale_dtype)
    observer.update(x)
    return observer.compute()


def explain(args: argparse.Namespace) -> dict:
    """The explanation as a dict (what ``--json`` prints)."""
    fmt = get_format(args.format)
    x = torch.tensor(args.values, dtype=torch.float32)
    qp = _qparams(x, fmt, args)
    codes = quantize(x, qp)
    decoded = dequantize(codes, qp)
    scale, zero = qp.expand(x.shape)
    rows = []
    for i in range(x.numel()):
        rows.append({
            "value": float(x[i]),
            "scale": float(scale.reshape(-1)[i] if scale.dim() else scale),
            "zero_point": float(zero.reshape(-1)[i] if zero.dim() else zero),
            "code": int(codes[i]),
            "bits": _bit_string(fmt, codes[i]),
            "decoded": float(decoded[i]),
            "error": float(decoded[i] - x[i]),
        })
    return {
        "format": fmt.name,
        "granularity": str(qp.granularity),
        "symmetric": qp.symmetric,
        "scale_dtype": qp.scale_dtype,
        "codes": [r["code"] for r in rows],
        "values": rows,
        "metrics": error_report(x, decoded),
    }


def run(args: argparse.Namespace) -> int:
    result = explain(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    mode = "symmetric" if result["symmetric"] else "asymmetric"
    print(f"{result['format']}  {result['granularity']}  {mode}  scale dtype "
          f"{result['scale_dtype']}")
    header = ("value", "scale", "zero", "code", "bits", "decoded", "error")
    lines = [header] + [
        (f"{r['value']:.6g}", f"{r['scale']:.6g}", f"{r['zero_point']:g}", str(r["code"]),
         r["bits"], f"{r['decoded']:.6g}", f"{r['error']:+.3g}")
        for r in result["values"]
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    m = result["metrics"]
    print(f"SQNR {m['sqnr_db']:.2f} dB   max |error| {m['max_abs_error']:.4g}   "
          f"cosine {m['cosine']:.6f}")
    return 0
