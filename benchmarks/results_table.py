"""The README's results table: run the benchmark matrix on SmolLM2 and print it as Markdown.

Equivalent to

    lowbit bench smollm2-135m --report report/ \
        --recipes bf16,w8,w8a8,w4g32,w4g128,w4g128-gptq,nf4g64

(same rows, same results.json / report.md / report.html / plots in --report), followed by a
compact Markdown table for the README and the command that regenerates it. An interrupted run
continues with --resume. Run it on an otherwise idle machine: the speed columns are measured.

Run: .venv/bin/python benchmarks/results_table.py [--windows 32] [--report report]
     [--recipes ...] [--peers torchao,quanto,llama.cpp] [--resume] [--no-speed]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

RECIPES = "bf16,w8,w8a8,w4g32,w4g128,w4g128-gptq,nf4g64"


def readme_table(results: dict) -> str:
    from lowbit.eval.report import speed_ratio

    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    base = next((r for r in rows if r["kind"] == "baseline"), None)
    lines = ["| config | bits/weight | PPL | ΔPPL | mean KLD | same top-1 | decode tok/s (x FP32, "
             "same engine) | kernel; engine |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        first = r["kind"] == "baseline"
        decode = r.get("decode_tok_s")
        speed = "—" if decode is None else f"{decode:.1f}"
        ratio = speed_ratio(r, base)
        if ratio and not first:
            speed += f" ({ratio:.2f}x)"
        kernels = r.get("kernels") or {}
        kernel = max(kernels, key=kernels.get) if kernels else "—"
        if r.get("engine"):
            kernel += f"; {r['engine']}"
        lines.append(
            f"| {r['id']} | {r['bits_per_weight']:.2f} | {r['ppl']:.3f} | "
            + ("—" if first else f"{r['delta_ppl_pct']:+.2f}%") + " | "
            + ("—" if first else f"{r['kld_mean']:.4f}") + " | "
            + ("—" if first else f"{100 * r['top1_agreement']:.1f}%")
            + f" | {speed} | {kernel} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipes", default=RECIPES)
    parser.add_argument("--peers", default="")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--report", default="report")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--plot-to", default="docs/pareto_ppl.png",
                        help="copy the Pareto plot here (the README shows it); '' to skip")
    args = parser.parse_args()

    from lowbit.eval.bench import BenchSettings, bench_command, run_bench, split_list

    settings = BenchSettings(model=args.model, recipes=tuple(split_list(args.recipes)),
                             peers=tuple(split_list(args.peers)), n_windows=args.windows,
                             speed=not args.no_speed, threads=args.threads)
    results = run_bench(settings, args.report, resume=args.resume, overwrite=not args.resume)
    s = results["settings"]
    print(f"\nSmolLM2-135M-Instruct ({args.model}), {s['n_windows']} x {s['window']} tokens of "
          f"the pydoc corpus, protocol {s['protocol']}; ΔPPL, KLD and top-1 against the FP32 "
          f"model; {results['environment']['threads']} threads.\n")
    print(readme_table(results))
    for r in results["rows"]:
        if r.get("status") != "ok":
            print(f"\n{r['id']}: {r['status']} {r.get('error', '')}")
    print(f"\nRegenerate: {bench_command(settings, args.report)}")
    print(f"Pareto plot: {args.report}/pareto_ppl.png; full report: {args.report}/report.md")
    plot = Path(args.report) / "pareto_ppl.png"
    if args.plot_to and plot.exists():
        Path(args.plot_to).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, args.plot_to)
        print(f"copied the Pareto plot to {args.plot_to}")


if __name__ == "__main__":
    main()
