"""lowbit's GGUF exports next to llama.cpp's own quantization, measured by llama.cpp itself.

Rows: SmolLM2 quantized by lowbit with each ``--recipes`` entry (calibrated ones on
``--calib-tokens`` tokens of the default calibration mix) and exported with its codes carried
unchanged (w8 -> Q8_0, w4g32 -> Q4_1, w4g32 symmetric -> Q4_0, ...); and llama.cpp's
``llama-quantize`` of lowbit's F32 export of the float model (``--llama-types``). For each
file: size, bits per weight (file bytes over the values its tensors hold), and for each of
``--texts`` (pydoc is the calibration mix's domain, the others are text calibration never
saw) llama.cpp's own perplexity and KL divergence against the F32 file
(``llama-perplexity --kl-divergence``, ``-c 512``, ``--chunks N``); optionally
``llama-bench -t 2 -p 512 -n 64``.

    python benchmarks/gguf_export.py [--recipes w8,w4g32,w4g32-gptq] [--chunks 8] [--json F]

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


def _export(recipe: str, out: Path, tokenizer, calib_tokens: int) -> tuple[Path, float]:
    """``recipe``'s GGUF file and the seconds quantizing took."""
    import lowbit

    model = lowbit.load_model(MODEL)
    parsed = lowbit.Recipe.parse(recipe)
    calib = (lowbit.data.text("default", tokenizer, tokens=calib_tokens)
             if parsed.needs_calibration else None)
    t0 = time.perf_counter()
    lowbit.quantize(model, parsed, calib, progress=False)
    seconds = time.perf_counter() - t0
    name = recipe.replace("(", "_").replace(")", "").replace(",", "_").replace("=", "")
    report = lowbit.export(model, "gguf", out / f"lowbit-{name}.gguf", overwrite=True,
                           tokenizer=tokenizer)
    print(f"{recipe}: quantized in {seconds:.0f}s, {report}", flush=True)
    return report.path, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="w8,w4g32", help="lowbit recipes to export")
    p.add_argument("--llama-types", default="Q8_0,Q4_1,Q4_0",
                   help="llama-quantize types of the F32 file to compare with")
    p.add_argument("--texts", default="pydoc,email", help="texts to score (built-in names)")
    p.add_argument("--chunks", type=int, default=8, help="perplexity windows of 512 tokens")
    p.add_argument("--calib-tokens", type=int, default=8192,
                   help="calibration tokens for calibrated recipes")
    p.add_argument("--out", default="/tmp/lowbit-gguf-bench", help="folder for the GGUF files")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="llama-bench repetitions")
    p.add_argument("--bench", action="store_true", help="also run llama-bench on each file")
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
    texts = {}
    for name in args.texts.split(","):
        texts[name] = out / f"{name}.txt"
        texts[name].write_text(corpus_text(name))
    tokenizer = lowbit.load_tokenizer(MODEL)
    f32 = out / "f32.gguf"
    if not f32.exists():
        lowbit.export(MODEL, "gguf", f32, float_type="f32", embedding_type="f32",
                      tokenizer=tokenizer)
    files: dict[str, tuple[Path, float | None]] = {}
    for recipe in filter(None, args.recipes.split(",")):
        files[f"lowbit {recipe}"] = _export(recipe, out, tokenizer, args.calib_tokens)
    for kind in filter(None, args.llama_types.split(",")):
        target = out / f"llama-quantize-{kind}.gguf"
        if not target.exists():
            tools.quantize(f32, target, kind, args.threads)
        files[f"llama-quantize {kind}"] = (target, None)

    rows, cpu = [], "?"
    for name, (path, seconds) in files.items():
        size = path.stat().st_size
        row = {"row": name, "bytes": size, "bits_per_weight": 8 * size / _values(path),
               "quantize_s": seconds, "texts": {}}
        for text, file in texts.items():
            base = out / f"f32-{text}-{args.chunks}.kld"
            row["texts"][text] = tools.kl_divergence(path, f32, file, base,
                                                     chunks=args.chunks, threads=args.threads)
        if args.bench:
            speed = tools.bench(path, args.threads, 512, 64, args.reps)
            cpu = speed["cpu"]
            row.update(prefill_tps=speed.get("prefill_tps"), decode_tps=speed.get("decode_tps"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    _print(rows, args, cpu)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "chunks": args.chunks,
                                               "calib_tokens": args.calib_tokens,
                                               "rows": rows}, indent=2))
    return 0


def _print(rows: list[dict], args, cpu: str) -> None:
    print(f"\nSmolLM2-135M; llama-perplexity --kl-divergence against the F32 file, -c 512 "
          f"--chunks {args.chunks}; calibrated recipes on {args.calib_tokens} tokens of the "
          f"default mix" + (f"; llama-bench -t {args.threads} -p 512 -n 64; CPU: {cpu}"
                            if args.bench else ""))
    texts = list(rows[0]["texts"]) if rows else []
    head = f"{'file':34} {'MiB':>6} {'bits/w':>6}" + "".join(
        f" {t + ' PPL':>11} {t + ' KLD':>11}" for t in texts)
    print(head + (f" {'pp512 t/s':>10} {'tg64 t/s':>9}" if args.bench else ""))
    for r in rows:
        cells = "".join(f" {r['texts'][t]['ppl']:11.3f} {r['texts'][t]['kld']:11.5f}"
                        for t in texts)
        speed = (f" {r['prefill_tps']:10.1f} {r['decode_tps']:9.1f}"
                 if r.get("prefill_tps") else "")
        print(f"{r['row']:34} {r['bytes'] / 2**20:6.1f} {r['bits_per_weight']:6.2f}"
              f"{cells}{speed}")


if __name__ == "__main__":
    sys.exit(main())
