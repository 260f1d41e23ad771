"""``lowbit export CKPT_OR_MODEL --to FORMAT -o OUT``: a file or folder another runtime runs:
a GGUF file (llama.cpp), a compressed-tensors folder (transformers, vLLM), a GPTQ folder or
an ONNX Runtime folder."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lowbit.export import FORMATS
    from lowbit.export.hf_checkpoint import DTYPES
    from lowbit.export.to_gguf import EMBEDDING_TYPES, TYPES

    p.add_argument("model", help="lowbit checkpoint folder, bundled name, HF folder or .gguf")
    p.add_argument("--to", default="gguf", choices=FORMATS,
                   help="format: gguf (llama.cpp), compressed-tensors (transformers, vLLM), "
                   "gptq (GPTQModel, vLLM) or onnx (ONNX Runtime); default gguf")
    p.add_argument("-o", "--output", required=True,
                   help="file to write for gguf (e.g. model.gguf), folder for the others")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    gguf = p.add_argument_group("gguf")
    gguf.add_argument("--type", default="f16", choices=TYPES,
                      help="type of unquantized linear weights: f32/f16, or rounded to a "
                      "llama.cpp block type (quantized layers always keep their own codes; "
                      "default f16)")
    gguf.add_argument("--embedding-type", default="auto", choices=EMBEDDING_TYPES,
                      help="type of the token embedding; default auto: as llama-quantize "
                      "writes it (a tied embedding shares the quantized head's codes; a gguf: "
                      "recipe's embedding gets llama.cpp's type for it; else f16)")
    gguf.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name (default: detected)")
    gguf.add_argument("--check", action="store_true",
                      help="read the file back and print, per type, the largest difference "
                      "from lowbit's weights")
    ox = p.add_argument_group("onnx")
    ox.add_argument("--accuracy-level", type=int, choices=range(5), default=None,
                    help="MatMulNBits accuracy_level: 0 = float32 products (lowbit's numbers), "
                    "4 = int8 activations; default 0 for 2/4-bit layers, 4 for 8-bit ones")
    ox.add_argument("--activations", choices=["per-token", "ort-dynamic"], default="per-token",
                    help="W8A8 activation codes: lowbit's per-token int8 (exact) or ONNX "
                    "DynamicQuantizeLinear (one uint8 scale per tensor, ORT-fused)")
    hf = p.add_argument_group("compressed-tensors, gptq")
    hf.add_argument("--dtype", choices=list(DTYPES),
                    help="float dtype of unquantized tensors (and compressed-tensors scales); "
                    "default bf16 for compressed-tensors, fp16 for gptq")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lowbit.export import ExportError, export
    from lowbit.model import load_model, load_tokenizer

    if Path(args.output).exists() and not args.overwrite:  # before the model loads
        raise ExportError(f"{args.output} already exists; choose another name or pass "
                          "--overwrite")
    if args.to == "gguf":
        options = {"float_type": args.type, "embedding_type": args.embedding_type,
                   "tokenizer_pre": args.tokenizer_pre}
    elif args.to == "onnx":
        options = {"accuracy_level": args.accuracy_level, "activations": args.activations}
    else:
        if args.check:
            raise ExportError("--check reads GGUF files; for a Hugging Face folder compare "
                              "its perplexity with benchmarks/hf_export.py")
        options = {"dtype": args.dtype} if args.dtype else {}
    model = load_model(args.model)
    report = export(model, args.to, args.output, overwrite=args.overwrite,
                    tokenizer=load_tokenizer(args.model), **options)
    print(report)
    if args.check:
        from lowbit.export.gguf_check import compare_weights

        for kind, diff in sorted(compare_weights(model, report.path).items()):
            print(f"  {kind.upper():5} {diff.tensors:4} tensors  max |diff| {diff.max_abs:.3g}  "
                  f"(relative to the row's largest weight: {diff.max_rel:.3g})")
    return 0
