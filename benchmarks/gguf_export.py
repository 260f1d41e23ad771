"""lowbit's GGUF exports next to llama.cpp's own quantization, measured by llama.cpp itself.

Rows: SmolLM2 quantized by lowbit with each ``--recipes`` entry (calibrated ones on
``--calib-tokens`` tokens of the default calibration mix, the CLI's default amount) and
exported with the default options (``lowbit export --to gguf``: codes carried unchanged,
llama-quantize's layout); and llama.cpp's ``llama-quantize`` of lowbit's F32 export of the
float model (``--llama-types``), also with an importance matrix (``--imatrix``:
``llama-imatrix`` over the same calibration text lowbit used). For each file: size, bits
per weight (file bytes over the values its tensors hold), and for each of ``--texts``
(pydoc is the calibration mix's domain; email is text calibration never saw) llama.cpp's
own perplexity and KL divergence against the F32 file (``llama-perplexity --kl-divergence``,
``-c 512``, ``--chunks N``); with ``--bench`` also ``llama-bench -t 2 -p 512 -n 64``.
``--report docs/gguf_export`` writes the rows as JSON, a markdown table and a plot.

    python benchmarks/gguf_export.py --recipes gguf:q4_k_m-gptq --llama-types Q4_K_M --imatrix

Needs llama.cpp's tools: scripts/build_llama_cpp.sh.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from lowbit.kernels.cpu import cpu_line

MODEL = "smollm2-135m"


def _values(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(path).tensors)


def _file_name(recipe: str) -> str:
    return recipe.replace("(", "_").replace(")", "").replace(",", "_").replace("=", "")


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
    report = lowbit.export(model, "gguf", out / f"lowbit-{_file_name(recipe)}.gguf",
                           overwrite=True, tokenizer=tokenizer)
    print(f"{recipe}: quantized in {seconds:.0f}s, {report}", flush=True)
    return report.path, seconds


def _calibration_file(out: Path, tokenizer, tokens: int) -> Path:
    """The text of lowbit's calibration windows, for ``llama-imatrix``."""
    import lowbit

    path = out / f"calibration-{tokens}.txt"
    if not path.exists():
        windows = lowbit.data.text("default", tokenizer, tokens=tokens)
        path.write_text("".join(tokenizer.decode(w[0].tolist()) for w in windows))
    return path


def _llama_files(args, out: Path, f32: Path, tokenizer) -> dict[str, tuple[Path, None]]:
    from lowbit.export import llama_cpp_tools as tools

    files = {}
    imatrix = None
    if args.imatrix:
        imatrix = out / f"imatrix-{args.calib_tokens}.gguf"
        if not imatrix.exists():
            tools.importance_matrix(f32, _calibration_file(out, tokenizer, args.calib_tokens),
                                    imatrix, chunks=args.calib_tokens // 512,
                                    threads=args.threads)
    for kind in filter(None, args.llama_types.split(",")):
        for matrix in ([None, imatrix] if imatrix else [None]):
            suffix = "-imatrix" if matrix else ""
            target = out / f"llama-quantize-{kind}{suffix}.gguf"
            if not target.exists():
                tools.quantize(f32, target, kind, args.threads, imatrix=matrix)
            files[f"llama-quantize {kind}{' + imatrix' if matrix else ''}"] = (target, None)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="gguf:q8_0,gguf:q4_0-gptq",
                   help="lowbit recipes to export")
    p.add_argument("--llama-types", default="Q8_0,Q4_0",
                   help="llama-quantize types of the F32 file to compare with")
    p.add_argument("--imatrix", action="store_true",
                   help="also llama-quantize with llama-imatrix over the calibration text")
    p.add_argument("--texts", default="pydoc,email", help="texts to score (built-in names)")
    p.add_argument("--chunks", type=int, default=8, help="perplexity windows of 512 tokens")
    p.add_argument("--calib-tokens", type=int, default=16384,
                   help="calibration tokens (lowbit's calibrated recipes and llama-imatrix)")
    p.add_argument("--out", default="/tmp/lowbit-gguf-bench", help="folder for the GGUF files")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="llama-bench repetitions")
    p.add_argument("--bench", action="store_true", help="also run llama-bench on each file")
    p.add_argument("--report", help="write PREFIX.json, PREFIX.md and PREFIX.png")
    p.add_argument("--append", action="store_true",
                   help="add the rows to an existing PREFIX.json (same settings) instead of "
                   "replacing it")
    p.add_argument("--speed-only", action="store_true",
                   help="time every file of the --report's rows found in --out with "
                   "llama-bench, one after another, and update their speeds only")
    args = p.parse_args(argv)
    if args.speed_only:
        return speed_only(args, argv)

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
    files.update(_llama_files(args, out, f32, tokenizer))

    rows, cpu = [], cpu_line()
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
            row.update(prefill_tps=speed.get("prefill_tps"), decode_tps=speed.get("decode_tps"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"commands": [_command(argv)], "cpu": cpu, "model": MODEL, "chunks": args.chunks,
              "calib_tokens": args.calib_tokens, "threads": args.threads, "rows": rows}
    if args.report and args.append and Path(args.report).with_suffix(".json").exists():
        result = _merged(json.loads(Path(args.report).with_suffix(".json").read_text()),
                         result)
    print("\n" + "\n".join(table(result)))
    if args.report:
        write_report(result, Path(args.report))
    return 0


def _command(argv: list[str] | None) -> str:
    """This run's command line as the report records it (quoted so it can be pasted)."""
    return "python benchmarks/gguf_export.py " + shlex.join(argv or sys.argv[1:])


def _row_file(out: Path, row: str) -> Path:
    """The GGUF file behind a report row (``lowbit <recipe>``, ``llama-quantize <T>[ +
    imatrix]``), as main names them."""
    if row.startswith("lowbit "):
        return out / f"lowbit-{_file_name(row.removeprefix('lowbit '))}.gguf"
    kind = row.removeprefix("llama-quantize ").replace(" + imatrix", "-imatrix")
    return out / f"llama-quantize-{kind}.gguf"


def speed_only(args, argv) -> int:
    """llama-bench on the files of an existing report, back to back in one run, so the
    speeds of files of one type compare (their sizes and types are equal)."""
    from lowbit.export import llama_cpp_tools as tools

    if not args.report or not Path(args.report).with_suffix(".json").exists():
        raise SystemExit("--speed-only needs --report PREFIX with an existing PREFIX.json")
    result = json.loads(Path(args.report).with_suffix(".json").read_text())
    rows = [r for r in result["rows"] if _row_file(Path(args.out), r["row"]).exists()]
    for r in result["rows"]:
        if r not in rows:
            print(f"{r['row']}: {_row_file(Path(args.out), r['row'])} is missing, its speed is "
                  "left out", flush=True)
            r.pop("prefill_tps", None), r.pop("decode_tps", None)
    # two passes, the second in reverse order, averaged: a drift of the machine's speed
    # during the run (it moves by 20-30% over minutes on a shared VM) cancels to first order
    runs: dict[str, list[dict]] = {r["row"]: [] for r in rows}
    for order in (rows, rows[::-1]):
        for r in order:
            runs[r["row"]].append(tools.bench(_row_file(Path(args.out), r["row"]), args.threads,
                                              512, 64, args.reps))
    for r in rows:
        for key in ("prefill_tps", "decode_tps"):
            r[key] = sum(run[key] for run in runs[r["row"]]) / len(runs[r["row"]])
        print(f"{r['row']}: pp512 {r['prefill_tps']:.0f} t/s, tg64 {r['decode_tps']:.1f} t/s",
              flush=True)
    timed = len(rows)
    result["commands"].append(_command(argv))
    result["speed_note"] = (f"speeds of {timed} files from the --speed-only command: llama-bench "
                            "on each file in two passes (the second in reverse order), averaged, "
                            f"on an otherwise idle CPU ({cpu_line()})")
    print("\n" + "\n".join(table(result)))
    write_report(result, Path(args.report))
    return 0


def _merged(old: dict, new: dict) -> dict:
    """``old``'s rows with ``new``'s added (a row of the same name replaced); the settings
    that the numbers depend on must agree."""
    for key in ("model", "chunks", "calib_tokens"):
        if old.get(key) != new[key]:
            raise SystemExit(f"--append: the report was measured with {key}={old.get(key)}, "
                             f"this run with {new[key]}; use the same settings or a new report")
    names = {r["row"] for r in new["rows"]}
    rows = [r for r in old["rows"] if r["row"] not in names] + new["rows"]
    kept = {k: old[k] for k in ("note", "speed_note") if k in old}  # what earlier runs said
    return {**new, **kept, "commands": old["commands"] + new["commands"], "rows": rows}


def table(result: dict) -> list[str]:
    """The rows as a markdown table, with how they were measured."""
    rows = result["rows"]
    texts = list(rows[0]["texts"]) if rows else []
    speed = any(r.get("decode_tps") for r in rows)
    lines = [*(f"`{c}`" for c in result["commands"]), "",
             f"SmolLM2-135M; llama.cpp's `llama-perplexity --kl-divergence` against the F32 "
             f"file, `-c 512 --chunks {result['chunks']}`; calibration (lowbit's algorithms and "
             f"llama-imatrix): {result['calib_tokens']} tokens of the default mix; pydoc is "
             f"the calibration domain, the other texts are held out"
             + (f"; speed: `llama-bench -t {result['threads']} -p 512 -n 64`" if speed else "")
             + f"; CPU: {result['cpu']}." + (f" {result['note']}" if result.get("note") else "")
             + (f" Speed: {result['speed_note']}." if result.get("speed_note") else ""),
             ""]
    head = "| file | MiB | bits/w |" + "".join(f" {t} PPL | {t} KLD |" for t in texts)
    lines += [head + (" pp512 t/s | tg64 t/s |" if speed else ""),
              "|---|---:|---:|" + "---:|---:|" * len(texts) + ("---:|---:|" if speed else "")]
    for r in rows:
        cells = "".join(f" {r['texts'][t]['ppl']:.3f} | {r['texts'][t]['kld']:.4f} |"
                        for t in texts)
        tps = (f" {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} |"
               if speed and r.get("decode_tps") else (" | |" if speed else ""))
        lines.append(f"| {r['row']} | {r['bytes'] / 2**20:.1f} | {r['bits_per_weight']:.2f} |"
                     f"{cells}{tps}")
    return lines


def write_report(result: dict, prefix: Path) -> None:
    """PREFIX.json (the rows), PREFIX.md (the table) and PREFIX.png (KLD against size)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    prefix.with_suffix(".md").write_text(
        "# GGUF exports in llama.cpp\n\nGenerated by the command below.\n\n"
        + "\n".join(table(result)) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(result["rows"][0]["texts"])
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False)
    for ax, text in zip(axes[0], texts, strict=True):
        for r in result["rows"]:
            lowbit = r["row"].startswith("lowbit")
            ax.scatter(r["bytes"] / 2**20, r["texts"][text]["kld"],
                       marker="o" if lowbit else ("s" if "imatrix" in r["row"] else "x"),
                       color="C0" if lowbit else "C1")
            ax.annotate(r["row"].split(" ", 1)[1], (r["bytes"] / 2**20,
                                                    r["texts"][text]["kld"]), fontsize=7)
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel("KL divergence to F32 (llama.cpp)")
        ax.set_yscale("log")
        ax.set_title(f"{text}: lowbit (o) vs llama-quantize (x, imatrix: s)")
    fig.suptitle(f"SmolLM2-135M GGUF files in llama.cpp; CPU: {result['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(prefix.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
