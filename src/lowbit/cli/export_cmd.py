"""``lowbit export CKPT_OR_MODEL --to gguf -o FILE``: a file another runtime (llama.cpp) runs."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lowbit.export.to_gguf import TYPES

    p.add_argument("model", help="lowbit checkpoint folder, bundled name, HF folder or .gguf")
    p.add_argument("--to", default="gguf", choices=["gguf"], help="file format (default gguf)")
    p.add_argument("-o", "--output", required=True, help="file to write (e.g. model.gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--type", default="f16", choices=TYPES,
                   help="type of unquantized linear weights: f32/f16, or rounded to a llama.cpp "
                   "block type (quantized layers always keep their own codes; default f16)")
    p.add_argument("--embedding-type", default="f16", choices=TYPES,
                   help="type of the token embedding (default f16)")
    p.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name (default: detected)")
    p.add_argument("--check", action="store_true",
                   help="read the file back and print, per type, the largest difference from "
                   "lowbit's weights")


def run(args: argparse.Namespace) -> int:
    from lowbit.export import export
    from lowbit.model import load_model, load_tokenizer

    model = load_model(args.model)
    report = export(model, args.to, args.output, overwrite=args.overwrite,
                    float_type=args.type, embedding_type=args.embedding_type,
                    tokenizer=load_tokenizer(args.model), tokenizer_pre=args.tokenizer_pre)
    print(report)
    if args.check:
        from lowbit.export.gguf_check import compare_weights

        for kind, diff in sorted(compare_weights(model, report.path).items()):
            print(f"  {kind.upper():5} {diff.tensors:4} tensors  max |diff| {diff.max_abs:.3g}  "
                  f"(relative to the row's largest weight: {diff.max_rel:.3g})")
    return 0
