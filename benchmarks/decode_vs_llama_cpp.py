"""lowbit's native decode loop against llama.cpp on the same weights, one after the other.

For each recipe (SmolLM2-135M; ``float``, ``w8``, ``w4g32``, ``gguf:q4_0``, ``w8a8``,
``nf4g64``, ``kmeans4`` by default) this quantizes the model with lowbit, then:

- times lowbit's decode (``DecoderRuntime``, float32, the one-call native loop): 64 greedy
  tokens after a 32-token prompt, median of ``--repeats`` after a warm-up, for float
  activations and int8 activations per block of 32 (AVX512-VNNI where the CPU has it, else
  AVX2); and the
  prefill of 512 tokens (one forward; float32 and bf16 runtimes);
- exports the same model to GGUF (``lowbit.export``: ``w8`` -> Q8_0, ``gguf:q4_0`` -> Q4_0,
  ``w4g32`` -> Q4_1, ``gguf:iq4_nl`` -> IQ4_NL, ``float`` -> F32) and runs
  ``llama-bench -t T -p 512 -n 64``;
- prints decode tokens/s of both, prefill of both (lowbit: the faster of its float32 and
  bf16 runtimes, each printed), and the achieved weight bandwidth (weight bytes the loop
  reads per token x tokens/s) beside the machine's measured copy bandwidth (a 256 MiB torch
  copy: bytes read + written per second);
- times the two against each other in alternating rounds (lowbit's prefill and decode, then
  ``llama-bench -r 1`` on the file, ``--repeats`` rounds after a warm-up one) and reports
  the median of the per-round ratios as ``decode_ratio`` / ``prefill_ratio``: the separate
  timings above lie minutes apart, and their ratio (kept as ``ratio_across_runs``) carries
  the machine's drift;
- times lowbit's decode at 1 thread and at ``--threads`` in alternating rounds (how the
  native loop scales with threads);
- for every recipe, its ratio to lowbit's own FP32 model (decode with float activations,
  prefill float32), timed alternately with it in the recipe's process (``vs_fp32``; the
  ratio to the ``float`` row, timed minutes earlier in another process, is kept as
  ``vs_fp32_across_processes``: on a shared VM the two processes can see speeds 20-30%
  apart). Recipes with no GGUF type (``w8a8``, ``nf4g64``, ``kmeans4``) are timed against
  that base only.

``--avx2-only`` runs the whole comparison as an AVX2-only CPU would on this machine: lowbit's
loop and prefill attention on their AVX2 kernels, torch and oneDNN capped at AVX2
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``) and llama.cpp built with AVX2
only (``LLAMA_CPP_ISA=avx2 bash scripts/build_llama_cpp.sh`` -> ``bin-avx2``). The memory
system stays this machine's, so it stands in for, and does not replace, a real AVX2 CPU.

    .venv/bin/python benchmarks/decode_vs_llama_cpp.py --out decode_vs_llama.json
    .venv/bin/python benchmarks/decode_vs_llama_cpp.py --recipes w8 --no-llama-cpp

Run it on an otherwise idle machine: the numbers are medians, but a neighbour's job moves
them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GGUF_NAMES = {"float": "F32", "w8": "Q8_0", "w4g32": "Q4_1", "gguf:q4_0": "Q4_0",
              "gguf:q8_0": "Q8_0", "gguf:iq4_nl": "IQ4_NL"}


def copy_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """GB/s of a large torch copy, bytes read plus bytes written."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def decode_tps(rt, prompt: torch.Tensor, tokens: int, repeats: int) -> float:
    """Median tokens/s of ``tokens`` greedy decode steps after ``prompt`` (prefill untimed),
    after a warm-up (``repeats`` 0: one timed run, no warm-up)."""
    rates = []
    for _ in range(repeats + 1):  # the first is a warm-up
        logits = rt.prefill(prompt, max_len=prompt.shape[1] + tokens)
        start = time.perf_counter()
        for _ in range(tokens):
            logits = rt.decode(logits.argmax(-1, keepdim=True))
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates[1:] or rates)


def prefill_tps(rt, length: int, repeats: int) -> float:
    """Median tokens/s of a ``length``-token prefill after a warm-up (``repeats`` 0: one
    timed run, no warm-up)."""
    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        rt.prefill(ids)
        times.append(time.perf_counter() - start)
    return length / statistics.median(times[1:] or times)


def int8_cost(runtimes: dict, prompt: torch.Tensor, tokens: int) -> dict:
    """int8 against float activations, teacher-forced on the float path's greedy tokens:
    share of equal argmax, max |logit difference|, mean KL(float || int8)."""
    logits = {}
    for act, rt in runtimes.items():
        out = [rt.prefill(prompt, max_len=prompt.shape[1] + tokens)]
        for i in range(tokens):
            feed = (logits["float"][i] if act != "float" else out[-1]).argmax(-1)
            out.append(rt.decode(feed.view(1, 1)).clone())
        logits[act] = torch.cat(out)
    ref, got = logits["float"], logits["int8"]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    return {"same_argmax": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff": (ref - got).abs().max().item(), "mean_kl": kl.item()}


def run_lowbit(model, args) -> dict:
    from lowbit.runtime import DecoderRuntime

    prompt = torch.randint(0, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    out, runtimes = {}, {}
    for act in ["float", "int8"]:
        rt = runtimes[act] = DecoderRuntime(model, dtype=torch.float32, activations=act)
        tps = decode_tps(rt, prompt, args.tokens, args.repeats)
        loop = rt._native_loop
        mb = loop.weight_bytes() / 1e6 if loop is not None else float("nan")
        out[act] = {"decode_tps": tps, "path": rt.decode_path, "weight_mb": mb,
                    "weight_gbps": mb * tps / 1e3}
        print(f"  lowbit {act:5s} activations: decode {tps:7.1f} tok/s  "
              f"({mb:.1f} MB/token -> {mb * tps / 1e3:.1f} GB/s)  [{rt.decode_path}]",
              flush=True)
    if "int8" in runtimes:
        out["int8_cost"] = cost = int8_cost(runtimes, prompt, args.tokens)
        print(f"  int8 activations vs float: same argmax {cost['same_argmax']:.1%}, max |dlogit| "
              f"{cost['max_abs_logit_diff']:.3f}, mean KL {cost['mean_kl']:.5f}", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        tps = prefill_tps(DecoderRuntime(model, dtype=dtype), 512, args.repeats)
        out[f"prefill_{name}_tps"] = tps
        print(f"  lowbit prefill 512 ({name}): {tps:7.1f} tok/s", flush=True)
    return out


def export_gguf(model, recipe: str, workdir: Path) -> Path:
    import lowbit

    path = workdir / f"{recipe.replace(':', '_')}.gguf"
    options = {"float_type": "f32", "embedding_type": "f32"} if recipe == "float" else {}
    lowbit.export(model, "gguf", path, overwrite=True, **options)
    return path


def run_llama(path: Path, recipe: str, args, repeats: int | None = None) -> dict:
    from lowbit.export import llama_cpp_tools

    res = llama_cpp_tools.bench(path, threads=args.threads, prompt=512, gen=args.tokens,
                                repetitions=args.repeats if repeats is None else repeats)
    res["file_mb"] = path.stat().st_size / 1e6
    if repeats is None:
        print(f"  llama.cpp {GGUF_NAMES.get(recipe, '?')}: decode {res['decode_tps']:7.1f} "
              f"tok/s, prefill {res['prefill_tps']:7.1f} tok/s ({res['file_mb']:.0f} MB file)",
              flush=True)
    return res


def faster(lb: dict) -> tuple[str, str]:
    """The recipe's faster prefill dtype and faster decode activations in ``run_lowbit``'s
    timings: what the paired and thread measurements run."""
    return (max(("float32", "bfloat16"), key=lambda d: lb[f"prefill_{d}_tps"]),
            max(("float", "int8"), key=lambda a: lb[a]["decode_tps"]))


def paired_vs_llama(model, lb: dict, path: Path, recipe: str, args) -> dict:
    """lowbit against llama.cpp in alternating rounds (one lowbit prefill 512 and one run of
    ``--tokens`` decode steps, then one ``llama-bench -r 1`` on the exported file), the
    ratio taken per round and its median reported, so that the machine's drift over
    minutes (20-30% on a shared VM) stays out of it; the first round is a warm-up."""
    from lowbit.runtime import DecoderRuntime

    dtype, act = faster(lb)
    pre = DecoderRuntime(model, dtype=getattr(torch, dtype))
    dec = DecoderRuntime(model, dtype=torch.float32, activations=act)
    prompt = torch.randint(0, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    rounds = []
    for _ in range(args.repeats + 1):
        ours = {"prefill": prefill_tps(pre, 512, 0), "decode": decode_tps(dec, prompt,
                                                                          args.tokens, 0)}
        theirs = run_llama(path, recipe, args, repeats=1)
        rounds.append({"lowbit": ours, "llama_cpp": {"prefill": theirs["prefill_tps"],
                                                     "decode": theirs["decode_tps"]}})
    out = {"prefill_dtype": dtype, "activations": act, "rounds": rounds[1:]}
    for m in ("prefill", "decode"):
        out[m] = statistics.median(r["lowbit"][m] / r["llama_cpp"][m] for r in rounds[1:])
    print(f"  alternating rounds with llama.cpp: prefill ({dtype}) {out['prefill']:.2f}x, "
          f"decode ({act} activations) {out['decode']:.2f}x (medians of per-round ratios)",
          flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="float,w8,w4g32,gguf:q4_0,w8a8,nf4g64,kmeans4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per run")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-llama-cpp", action="store_true", help="time lowbit only")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--avx2-only", action="store_true",
                        help="lowbit, torch and llama.cpp (its AVX2 build) limited to AVX2")
    parser.add_argument("--row-out", help=argparse.SUPPRESS)  # one recipe, in a child
    args = parser.parse_args(argv)

    from lowbit.kernels.cpu import cpu_line
    from lowbit.runtime.native_loop import has_vnni

    torch.set_num_threads(args.threads)
    if args.row_out:
        import contextlib

        from lowbit.runtime.native_loop import avx2_only

        with avx2_only() if args.avx2_only else contextlib.nullcontext():
            row = measure_recipe(args.recipes, args)
        Path(args.row_out).write_text(json.dumps(row))
        return {}
    env = avx2_env(args) if args.avx2_only else None
    report = {"command": "python benchmarks/decode_vs_llama_cpp.py " + " ".join(sys.argv[1:]),
              "cpu": cpu_line(), "threads": args.threads,
              "vnni": has_vnni() and not args.avx2_only,
              "isa": "avx2 only (emulated, see --avx2-only)" if env else "native",
              "torch": torch.__version__, "copy_gbps": copy_bandwidth(), "recipes": {},
              "protocol": "each recipe in a fresh process (no allocator or cache state "
                          "carried from the recipe before); ratios to llama.cpp and to FP32 "
                          "are medians over alternating rounds in that process"}
    print(f"CPU: {report['cpu']}  threads {args.threads}  AVX512-VNNI: {report['vnni']}  "
          f"copy bandwidth {report['copy_gbps']:.1f} GB/s (read + write)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            print(f"{recipe}:", flush=True)
            out = Path(tmp) / "row.json"
            child = list(argv if argv is not None else sys.argv[1:])
            subprocess.run([sys.executable, __file__, *child, "--recipes", recipe,
                            "--row-out", str(out)], check=True, env=env)
            row = report["recipes"][recipe] = json.loads(out.read_text())
            ratios(row, report["recipes"].get("float") if recipe != "float" else None)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def avx2_env(args) -> dict:
    """The children's environment for ``--avx2-only``: torch/oneDNN capped at AVX2 and
    llama.cpp's AVX2-only build."""
    import os

    from lowbit.export import llama_cpp_tools

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    if not args.no_llama_cpp:
        avx2_bin = llama_cpp_tools.tool_dir().parent / "bin-avx2"
        if not (avx2_bin / "llama-bench").is_file():
            raise SystemExit(f"--avx2-only needs llama.cpp's AVX2-only build in {avx2_bin}: "
                             "run LLAMA_CPP_ISA=avx2 bash scripts/build_llama_cpp.sh "
                             "(or pass --no-llama-cpp)")
        env["LOWBIT_LLAMA_CPP_BIN"] = str(avx2_bin)
    return env


def paired_vs_fp32(model, lb: dict, args) -> dict:
    """The recipe against lowbit's FP32 model timed alternately in this process (round by
    round, medians), so the machine's drift between processes stays out of the ratio:
    prefill 512 (the recipe's faster runtime dtype against FP32's float32) and decode (its
    faster activations against FP32's float activations)."""
    import lowbit
    from lowbit.runtime import DecoderRuntime

    dtype, act = faster(lb)
    runtimes = {"recipe": (DecoderRuntime(model, dtype=getattr(torch, dtype)),
                           DecoderRuntime(model, dtype=torch.float32, activations=act)),
                "fp32": (DecoderRuntime(lowbit.load_model("smollm2-135m"), dtype=torch.float32),)}
    runtimes["fp32"] += runtimes["fp32"]  # float activations: the FP32 runtime's default
    prompt = torch.randint(0, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    rates: dict = {k: {"prefill": [], "decode": []} for k in runtimes}
    for _ in range(args.repeats + 1):
        for name, (pre, dec) in runtimes.items():
            rates[name]["prefill"].append(prefill_tps(pre, 512, 0))
            rates[name]["decode"].append(decode_tps(dec, prompt, args.tokens, 0))
    med = {k: {m: statistics.median(v[1:]) for m, v in r.items()} for k, r in rates.items()}
    out = {"prefill_dtype": dtype, "activations": act, "tps": med,
           "prefill": med["recipe"]["prefill"] / med["fp32"]["prefill"],
           "decode": med["recipe"]["decode"] / med["fp32"]["decode"]}
    print(f"  same process, alternating with FP32: prefill ({dtype}) "
          f"{med['recipe']['prefill']:.1f} vs {med['fp32']['prefill']:.1f} tok/s = "
          f"{out['prefill']:.2f}x, decode ({act}) {med['recipe']['decode']:.1f} vs "
          f"{med['fp32']['decode']:.1f} = {out['decode']:.2f}x", flush=True)
    return out


def thread_scaling(model, lb: dict, args) -> dict:
    """Decode tokens/s (the faster activations) at 1 thread and at ``--threads``, timed in
    alternating rounds; ``speedup`` is the ratio of the medians."""
    from lowbit.runtime import DecoderRuntime

    act = faster(lb)[1]
    rt = DecoderRuntime(model, dtype=torch.float32, activations=act)
    prompt = torch.randint(0, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    counts = sorted({1, args.threads})
    rates: dict = {t: [] for t in counts}
    try:
        for _ in range(args.repeats + 1):
            for t in counts:
                torch.set_num_threads(t)
                rates[t].append(decode_tps(rt, prompt, args.tokens, 0))
    finally:
        torch.set_num_threads(args.threads)
    med = {t: statistics.median(r[1:]) for t, r in rates.items()}
    out = {"activations": act, "decode_tps": med, "speedup": med[counts[-1]] / med[1]}
    print(f"  decode threads {' / '.join(map(str, counts))}: "
          f"{' / '.join(f'{med[t]:.1f}' for t in counts)} tok/s = {out['speedup']:.2f}x",
          flush=True)
    return out


def measure_recipe(recipe: str, args) -> dict:
    """lowbit's numbers for one recipe and, where a GGUF type exists, llama.cpp's."""
    import lowbit

    model = lowbit.load_model("smollm2-135m")
    if recipe != "float":
        lowbit.quantize(model, recipe, progress=False)
    row = {"lowbit": run_lowbit(model, args)}
    row["thread_scaling"] = thread_scaling(model, row["lowbit"], args)
    if recipe != "float":
        row["paired_vs_fp32"] = paired_vs_fp32(model, row["lowbit"], args)
    if not args.no_llama_cpp and recipe in GGUF_NAMES:
        with tempfile.TemporaryDirectory() as tmp:
            path = export_gguf(model, recipe, Path(tmp))
            row["llama_cpp"] = run_llama(path, recipe, args)
            row["paired_vs_llama_cpp"] = paired_vs_llama(model, row["lowbit"], path, recipe,
                                                         args)
    return row


def ratios(row: dict, fp32: dict | None) -> None:
    """Add (and print) the row's ratios to lowbit's FP32 row and to llama.cpp."""
    lb = row["lowbit"]
    best = max(v["decode_tps"] for v in lb.values() if isinstance(v, dict) and "decode_tps" in v)
    prefill = max(lb["prefill_float32_tps"], lb["prefill_bfloat16_tps"])
    if fp32 is not None:  # lowbit's own FP32 runtime (float32 prefill) as the base
        base = fp32["lowbit"]
        row["vs_fp32_across_processes"] = {"decode": best / base["float"]["decode_tps"],
                                           "prefill": prefill / base["prefill_float32_tps"]}
        paired = row.get("paired_vs_fp32")
        if paired:  # the same-process alternation is the ratio reported
            row["vs_fp32"] = {"decode": paired["decode"], "prefill": paired["prefill"]}
        print(f"  ratio to lowbit FP32 (FP32 timed in its own process, earlier): decode "
              f"{row['vs_fp32_across_processes']['decode']:.2f}x, prefill "
              f"{row['vs_fp32_across_processes']['prefill']:.2f}x", flush=True)
    if "llama_cpp" in row:
        llama = row["llama_cpp"]
        row["ratio_across_runs"] = {"decode": best / llama["decode_tps"],
                                    "prefill": prefill / llama["prefill_tps"]}
        print(f"  ratio lowbit / llama.cpp (separate timings): decode "
              f"{row['ratio_across_runs']['decode']:.2f}x, prefill (best of float32 / bf16) "
              f"{row['ratio_across_runs']['prefill']:.2f}x", flush=True)
        paired = row.get("paired_vs_llama_cpp")
        if paired:  # the alternating rounds are the ratios reported
            row["decode_ratio"], row["prefill_ratio"] = paired["decode"], paired["prefill"]


if __name__ == "__main__":
    main()
