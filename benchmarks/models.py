"""SmolLM2-135M end to end: quality, size, speed and quantization memory of lowbit's recipes.

Protocol:
- PPL: first 16,384 tokens of CPython 3.11's pydoc topics, 32 windows of 512, every token
  scored; ΔPPL, KL divergence and top-1 agreement against the FP32 model.
- Speed: prefill = one forward of 1x512 tokens; decode = 64 greedy tokens after a 32-token
  prompt with a KV cache; median of 3 after a warm-up; 2 threads. The baseline is torch FP32
  eager with Hugging Face ``generate``, timed right before and right after each config in
  the same process; the ratio divides by the mean of those two FP32 runs (> 1 = faster).
  lowbit configs decode with lowbit's runtime (static KV cache) and prefill with the model's
  own forward; the engine is printed.
- Bytes: the quantized linears' codes + scales + zero-points in memory vs their FP32 bytes.
- Kernel policy (``--policies measured,flags``): each recipe quantized and timed once per
  policy inside the same FP32 bracket: ``measured`` = the kernels ``lowbit kernels`` chose
  by timing them on this machine (the default), ``flags`` = the earlier choice by CPU flags
  (``assume_cpu`` with the detected features), so before/after compare in one process.
- Engines: lowbit configs are also set beside FP32 on lowbit's own runtime (timed once at
  the start: ``decode_same_engine_x``), which separates the kernels' gain from the runtime's.
- The CPU's features are printed first: which kernels win depends on them (native bf16 and
  VNNI, ``lowbit.kernels.cpu``); compare rows only within one CPU.
- Peak memory while quantizing (``--memory``): a subprocess imports lowbit, resets the
  kernel's peak-RSS counter (/proc/self/clear_refs), loads the FP32 model (its weights are
  copied out of the safetensors mapping into process memory), quantizes in place, and
  reports (peak RSS - RSS before loading) / (FP32 parameter bytes, the tied weight once):
  the model itself counts as 1.0x. Also printed: the file-backed part of the growth.

SmolLM2's weights were Q4_1 (block-32 asymmetric 4-bit) before dequantization, so w4g32 is
the easy case here; w4g128 is the honest 4-bit comparison.

Run: .venv/bin/python benchmarks/models.py [--recipes bf16,w8,w4g128,w4g32,w8a8]
     [--windows 32] [--no-speed] [--memory] [--policies measured,flags] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys

import torch

from lowbit.cli.common import calibration_batches
from lowbit.eval import evaluate, measure_speed, model_size
from lowbit.model import Recipe, load_model, load_tokenizer, quantize

_MEMORY_PROBE = r"""
import sys, torch
from lowbit.model import load_model, load_tokenizer, quantize
def status():
    return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status')
            if l.startswith(('VmRSS', 'VmHWM', 'RssFile'))}
torch.set_num_threads(2)
load_tokenizer('smollm2-135m')  # imports transformers (not counted), as algorithms.py
before = status()
open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS
model = load_model('smollm2-135m')
fp32 = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weight once
quantize(model, sys.argv[1], progress=False)
after = status()
print((after['VmHWM'] - before['VmRSS']) / fp32, fp32 / 1e6,
      (after['VmHWM'] - before['VmRSS']) / 1e6, (after['RssFile'] - before['RssFile']) / 1e6)
"""


def quantize_memory(recipe: str) -> tuple[float, float, float, float]:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, recipe.partition("/")[0]],
                         capture_output=True,
                         text=True, check=True)
    ratio, model_mb, peak_mb, file_mb = map(float, out.stdout.split()[-4:])
    return ratio, model_mb, peak_mb, file_mb


def fp32_speed(model, ids):
    return measure_speed(model, ids, engine="hf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="bf16,w8,w4g128,w4g32,w8a8",
                    help="comma-separated; NAME/keep=lm_head keeps the output head in float")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--memory", action="store_true", help="measure peak RSS while quantizing")
    ap.add_argument("--policies", default="measured",
                    help="comma-separated kernel policies to time per recipe: measured, flags")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from lowbit.kernels import cpu_features

    print(f"# CPU: {cpu_features().describe()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    base = load_model(args.model)
    tok = load_tokenizer(args.model)
    from lowbit.data import tokens

    ids = tokens("pydoc", tok, count=512 * args.windows)
    fp32_bytes = model_size(base).linear_bytes
    rows = []
    base_eval = evaluate(base, tok, baseline=base, n_windows=args.windows, speed=False)
    print(f"FP32 PPL {base_eval['ppl']:.3f} ({args.windows}x512 tokens, every token scored)")
    fp32_lowbit = None if args.no_speed else measure_speed(base, ids, engine="lowbit")
    if fp32_lowbit is not None:
        print(f"FP32 on lowbit's runtime: prefill {fp32_lowbit.prefill_s:.3f} s, decode "
              f"{fp32_lowbit.decode_tok_s:.1f} tok/s", flush=True)
    policies = [p for p in args.policies.split(",") if p]
    for name in [r for r in args.recipes.split(",") if r]:
        recipe = _recipe(name)
        calib = calibration_batches(tok, None, tokens=8192) if recipe.needs_calibration else None
        group = []
        for policy in policies:
            model = copy.deepcopy(base)
            with _policy(policy):
                quantize(model, recipe, calib, progress=False)
                r = evaluate(model, tok, baseline=base, n_windows=args.windows, speed=False)
            label = name if len(policies) == 1 else f"{name}@{policy}"
            group.append(({"recipe": label, "ppl": r["ppl"],
                           "delta_ppl_pct": r["delta_ppl_pct"], "kld_mean": r["kld_mean"],
                           "top1": r["top1_agreement"],
                           "linear_bytes_ratio": r["linear_bytes"] / fp32_bytes,
                           "bits_per_weight": r["bits_per_weight"], "kernels": r["kernels"]},
                          model, policy))
        if not args.no_speed:
            before = fp32_speed(base, ids)
            mine = []
            for _, model, policy in group:
                with _policy(policy):
                    mine.append(measure_speed(model, ids))
            after = fp32_speed(base, ids)
            ref_prefill = (before.prefill_s + after.prefill_s) / 2
            ref_decode = (before.decode_tok_s + after.decode_tok_s) / 2
            for (row, _, _), m in zip(group, mine, strict=True):
                row.update(prefill_s=m.prefill_s, decode_tok_s=m.decode_tok_s,
                           engine=m.engine, fp32_prefill_s=ref_prefill,
                           fp32_decode_tok_s=ref_decode,
                           prefill_x=ref_prefill / m.prefill_s,
                           decode_x=m.decode_tok_s / ref_decode,
                           decode_same_engine_x=m.decode_tok_s / fp32_lowbit.decode_tok_s)
        for row, _, _ in group:
            if args.memory:
                (row["quantize_peak_x"], _, row["quantize_peak_mb"],
                 row["quantize_file_pages_mb"]) = quantize_memory(name)
            rows.append(row)
            print(_line(row), flush=True)
        del group
    print()
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _policy(policy: str):
    """``measured``: the kernels chosen by timing them here; ``flags``: by CPU flags."""
    if policy == "flags":
        from lowbit.kernels import assume_cpu

        return assume_cpu()
    if policy != "measured":
        raise SystemExit(f"unknown policy {policy!r}: use measured or flags")
    return contextlib.nullcontext()


def _recipe(name: str) -> Recipe:
    """``w8`` or ``w8/keep=lm_head`` (the recipe with a module kept as it is)."""
    preset, _, keep = name.partition("/keep=")
    recipe = Recipe.parse(preset)
    return recipe.with_keep(keep) if keep else recipe


def _line(row: dict) -> str:
    parts = [f"{row['recipe']:>12}", f"PPL {row['ppl']:.3f}", f"Δ {row['delta_ppl_pct']:+.2f}%",
             f"KLD {row['kld_mean']:.4f}", f"top-1 {100 * row['top1']:.1f}%",
             f"bytes {row['linear_bytes_ratio']:.3f}x"]
    if "prefill_x" in row:
        parts += [f"prefill {row['prefill_x']:.2f}x", f"decode {row['decode_x']:.2f}x "
                  f"({row['decode_tok_s']:.1f} vs {row['fp32_decode_tok_s']:.1f} tok/s, "
                  f"{row['engine']}; {row['decode_same_engine_x']:.2f}x FP32 on it)"]
    if "quantize_peak_x" in row:
        parts.append(f"quantize peak {row['quantize_peak_x']:.2f}x FP32 model (of which "
                     f"{row['quantize_file_pages_mb']:.0f} MB mmapped weight pages)")
    return "  ".join(parts)


def _table(rows: list[dict]) -> str:
    head = ("| recipe | PPL | ΔPPL | KLD | top-1 | linear bytes vs FP32 | bits/weight | "
            "prefill × | decode × (vs HF FP32) | decode × (vs FP32, same runtime) | kernel |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        kernel = max(r["kernels"].items(), key=lambda kv: kv[1])[0]
        speed = (f"{r['prefill_x']:.2f}", f"{r['decode_x']:.2f}",
                 f"{r['decode_same_engine_x']:.2f}") if "prefill_x" in r else ("-", "-", "-")
        lines.append(f"| {r['recipe']} | {r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f}% | "
                     f"{r['kld_mean']:.4f} | {100 * r['top1']:.1f}% | "
                     f"{r['linear_bytes_ratio']:.3f}x | {r['bits_per_weight']:.2f} | "
                     f"{speed[0]} | {speed[1]} | {speed[2]} | {kernel} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
