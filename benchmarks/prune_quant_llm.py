"""Perplexity vs bytes on SmolLM2-135M: prune only, quantize only, and prune -> quantize.

    python benchmarks/prune_quant_llm.py [--windows 8] [--variants ...]

Post-training only (no fine-tuning: the digits CNN in ``prune_quant.py`` shows the
fine-tuned version). Pruning is per-layer magnitude pruning (``lowbit.training.prune``:
unstructured, or 2:4 semi-structured along the inputs) of the 210 decoder linears; the output
head is tied to the token embedding, so it is skipped by pruning (zeroing it would zero
embedding rows) and, to compare like with like, kept in FP32 by every recipe here. Quantizing
is ``lowbit.quantize`` with the named recipe on the pruned weights.

Columns: PPL on the first ``--windows`` x 512 tokens of the pydoc corpus (every token
scored), ΔPPL vs FP32, the share of decoder-linear weights that are exactly zero after
quantization (asymmetric grids with a float zero-point, as in ``w4g32``, do not hold an exact
0, so they lose the sparsity), and decoder-linear bytes: dense FP32; packed codes + scales
(``weight_nbytes``); for pruned layers that kept their zeros a sparse layout estimate
(``sparse_nbytes``: 1-bit map + kept values, or 2-bit indices per kept value for 2:4) of the
kept codes, plus the scales.
"""

from __future__ import annotations

import argparse
import copy

import torch

VARIANTS = ("fp32,prune10,prune25,prune50,prune2:4,w8,w4g128,w4g32,prune10+w8,prune25+w8,"
            "prune25+w4g128,prune2:4+w8")


def _split(variant: str) -> tuple[str | None, float, str | None]:
    """``prune50+w8`` -> (pattern, sparsity, recipe)."""
    pattern, sparsity, recipe = None, 0.0, None
    for part in variant.split("+"):
        if part.startswith("prune"):
            rest = part.removeprefix("prune")
            pattern, sparsity = ("2:4", 0.5) if rest == "2:4" else ("unstructured",
                                                                    int(rest) / 100)
        elif part != "fp32":
            recipe = part
    return pattern, sparsity, recipe


def _layer_bytes(model, masks, pattern) -> tuple[float, float]:
    """(bytes of the decoder linears as stored/estimated, fraction of exact zeros)."""
    from lowbit.nn import QuantizedLinear
    from lowbit.training import sparse_nbytes

    total = zeros = numel = 0.0
    for name, m in model.named_modules():
        if name.endswith("lm_head") or not isinstance(m, (torch.nn.Linear, QuantizedLinear)):
            continue
        if isinstance(m, QuantizedLinear):
            w = m.dequantize_weight()
            dense = m.weight_nbytes()
            code_bits = m.packed_weight().qparams.format.bits
            scales = dense - w.numel() * code_bits / 8
        else:
            w = m.weight.detach()
            dense, code_bits, scales = w.numel() * 4, 32, 0
        mask = masks.masks.get(name) if masks else None
        if mask is not None and float((w == 0).sum()) < 0.99 * float((~mask).sum()):
            mask = None  # the grid lost the exact zeros: no sparse layout, dense bytes
        total += dense if mask is None else sparse_nbytes(mask, code_bits, pattern) + scales
        zeros += float((w == 0).sum())
        numel += w.numel()
    return total, zeros / numel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=VARIANTS)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import lowbit
    from lowbit.eval import perplexity
    from lowbit.training import prune

    base = lowbit.load_model("smollm2-135m")
    tok = lowbit.load_tokenizer("smollm2-135m")
    ids = lowbit.data.tokens("pydoc", tok, count=512 * args.windows)
    rows, fp32_ppl = [], None
    for variant in args.variants.split(","):
        pattern, sparsity, recipe = _split(variant)
        model = copy.deepcopy(base)
        masks = prune(model, sparsity, pattern, skip=("lm_head",)) if pattern else None
        if recipe:
            lowbit.quantize(model, lowbit.Recipe.parse(recipe).with_keep("lm_head"),
                            progress=False)
        ppl = perplexity(model, ids, window=512, n_windows=args.windows).ppl
        fp32_ppl = fp32_ppl or ppl if variant == "fp32" else fp32_ppl
        nbytes, zero_share = _layer_bytes(model, masks, pattern)
        rows.append((variant, ppl, nbytes, zero_share))
        print(f"{variant:18s} PPL {ppl:9.3f}  zeros {100 * zero_share:5.1f}%  "
              f"decoder linears {nbytes / 1e6:6.1f} MB", flush=True)
        del model
    print(f"\nSmolLM2-135M, {args.windows} x 512 tokens of pydoc topics, every token scored; "
          "no fine-tuning; head kept FP32\n")
    print("| variant | PPL | ΔPPL | exact zeros | decoder-linear MB | vs FP32 |")
    print("|---|---:|---:|---:|---:|---:|")
    dense = rows[0][2] if rows and rows[0][0] == "fp32" else None
    for variant, ppl, nbytes, zero_share in rows:
        delta = f"{100 * (ppl / fp32_ppl - 1):+.1f}%" if fp32_ppl else "-"
        ratio = f"{nbytes / dense:.3f}x" if dense else "-"
        print(f"| {variant} | {ppl:.3f} | {delta} | {100 * zero_share:.1f}% | "
              f"{nbytes / 1e6:.1f} | {ratio} |")
    print(f"\ncommand: python benchmarks/prune_quant_llm.py --windows {args.windows} "
          f"--variants {args.variants}")


if __name__ == "__main__":
    main()
