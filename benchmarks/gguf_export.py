"""lowbit's GGUF exports next to llama.cpp's own quantization, measured by llama.cpp itself.

Rows: SmolLM2 quantized by lowbit (w8 -> Q8_0, w4g32 -> Q4_1, codes carried unchanged) and
exported; and llama.cpp's ``llama-quantize`` Q8_0 / Q4_1 / Q4_0 of lowbit's F32 export of the
float model. For each: file size, bits per weight (file bytes over the values its tensors
hold), ``llama-perplexity -c 512 --chunks N`` on the pydoc corpus (and lowbit's own PPL
under the same protocol for the rows lowbit computes), and ``llama-bench -t 2 -p 512 -n 64``.

    python benchmarks/gguf_export.py [--chunks 8] [--out DIR] [--json FILE]

Needs llama.cpp's tools: scripts/build_llama_cpp.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"


def _values(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(path).tensors)


def _lowbit_ppl(model, tokenizer, text: Path, chunks: int) -> float:
    from lowbit.eval import evaluate

    return evaluate(model, tokenizer, data=str(text), window=512, n_windows=chunks,
                    protocol="llama.cpp", speed=False)["ppl"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=8, help="perplexity windows of 512 tokens")
    p.add_argument("--out", default="/tmp/lowbit-gguf-bench", help="folder for the GGUF files")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="llama-bench repetitions")
    p.add_argument("--no-bench", action="store_true", help="skip llama-bench")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    import lowbit
    from lowbit.data.corpus import corpus_text
    from lowbit.export import llama_cpp_tools as tools

    if tools.find_tool("llama-perplexity") is None:
        print(f"llama.cpp tools not found in {tools.tool_dir()}; {tools.BUILD_HINT}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = out / "pydoc.txt"
    text.write_text(corpus_text("pydoc"))
    tokenizer = lowbit.load_tokenizer(MODEL)
    files: dict[str, tuple[Path, float | None]] = {}

    for recipe in ("w8", "w4g32"):
        model = lowbit.load_model(MODEL)
        lowbit.quantize(model, recipe, progress=False)
        t0 = time.perf_counter()
        report = lowbit.export(model, "gguf", out / f"lowbit-{recipe}.gguf", overwrite=True,
                               tokenizer=tokenizer)
        kind = "Q8_0" if recipe == "w8" else "Q4_1"
        print(f"exported {recipe} in {time.perf_counter() - t0:.0f}s: {report}", flush=True)
        files[f"lowbit {recipe} -> {kind}"] = (report.path,
                                               _lowbit_ppl(model, tokenizer, text, args.chunks))
        del model
    f32 = lowbit.export(MODEL, "gguf", out / "f32.gguf", overwrite=True, float_type="f32",
                        embedding_type="f32", tokenizer=tokenizer).path
    for kind in ("Q8_0", "Q4_1", "Q4_0"):
        target = out / f"llama-quantize-{kind}.gguf"
        target.unlink(missing_ok=True)
        files[f"llama-quantize {kind}"] = (tools.quantize(f32, target, kind, args.threads), None)

    rows = []
    cpu = "?"
    for name, (path, ours) in files.items():
        size = path.stat().st_size
        row = {"row": name, "bytes": size, "bits_per_weight": 8 * size / _values(path),
               "llama_cpp_ppl": tools.perplexity(path, text, 512, args.chunks, args.threads),
               "lowbit_ppl": ours}
        if not args.no_bench:
            speed = tools.bench(path, args.threads, 512, 64, args.reps)
            cpu = speed["cpu"]
            row.update(prefill_tps=speed.get("prefill_tps"), decode_tps=speed.get("decode_tps"))
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nSmolLM2-135M, pydoc corpus, llama-perplexity -c 512 --chunks {args.chunks}; "
          f"llama-bench -t {args.threads} -p 512 -n 64 -r {args.reps}; CPU: {cpu}")
    head = f"{'file':28} {'MiB':>7} {'bits/w':>7} {'PPL llama.cpp':>14} {'PPL lowbit':>11}"
    print(head + f" {'pp512 t/s':>10} {'tg64 t/s':>9}")
    for r in rows:
        ours = f"{r['lowbit_ppl']:.3f}" if r["lowbit_ppl"] else "-"
        speed = (f" {r['prefill_tps']:10.1f} {r['decode_tps']:9.1f}"
                 if r.get("prefill_tps") else "")
        print(f"{r['row']:28} {r['bytes'] / 2**20:7.1f} {r['bits_per_weight']:7.2f} "
              f"{r['llama_cpp_ppl']:14.3f} {ours:>11}{speed}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
