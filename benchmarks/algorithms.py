"""Quantization algorithms side by side on SmolLM2-135M: quality, size, time, memory.

For each recipe: quantize a fresh copy of the FP32 model (the 210 decoder linears; the tied
embedding / ``lm_head`` stays as it is, as in BENCHMARKS.md's peer table) with 128 x 512
calibration tokens from the pydoc corpus (tokens 20,000 onward), then score the evaluation
windows (the first ``n_windows`` x 512 tokens) once and report both protocols from the same
logits:

- ``full``: every predicted token (BENCHMARKS.md's Python protocol);
- ``llama.cpp``: the second half of each window (``llama-perplexity -c 512``), to set beside
  llama.cpp's table (Q4_K_M +7.9%, Q3_K_M +13.4%, Q2_K +41.5%, ...).

Columns: PPL, dPPL vs FP32, mean KL(FP32 || model) and top-1 agreement per token, bits per
linear weight as stored (codes + scales + zero-points + codebooks: what ``save`` writes),
quantize seconds and the RSS growth during quantization (the process also holds the FP32
model and its logits; ``--memory`` measures quantization alone in a fresh process), and the
dPPL of the RTN recipe of the same format beside each calibrated one.

Run:
  .venv/bin/python benchmarks/algorithms.py                       # everything, 32 windows
  .venv/bin/python benchmarks/algorithms.py --recipes w4g128,w4g128-gptq --n-windows 8
  .venv/bin/python benchmarks/algorithms.py --memory w4g128-gptq   # peak RSS vs model size
  .venv/bin/python benchmarks/algorithms.py --recipes w4g128-gptq,w4g128-gptq/f32in  # A/B:
      # calibration block inputs held in float16 (the default) or float32
  .venv/bin/python benchmarks/algorithms.py --recipes w3g64-gptq-rot/refine0,w3g64-gptq-rot
      # A/B: plain GPTQ against the default 2 rounds of refinement (algorithms/refine.py)
  .venv/bin/python benchmarks/algorithms.py --recipes w4g128-gptq/whole+torchloops,w4g128-gptq
      # A/B: the calibration loop before residual branches and C column loops, and now
Results are also appended to ``--out`` (JSON lines) as each recipe finishes;
``--tables a.jsonl b.jsonl`` prints the tables of saved results (e.g. of parallel runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import threading
import time
from pathlib import Path

RECIPES = ("w4g128,w4g128-gptq,w4g128-awq,w4g128-hqq,w4g128-imatrix,"
           "w3g64,w3g64-gptq,w3g64-awq,w3g64-hqq,w3g64-imatrix,w3g64-gptq-rot,w4g64-gptq-rot,"
           "w2g16,w2g16-gptq,w2g16-awq,w2g16-hqq,w2g16-imatrix,"
           "kmeans4,w8a8-static,w8a8-smooth,auto:3.5")
LLAMA_CPP = {"Q8_0": 0.48, "Q6_K": 1.38, "Q4_K_M": 7.93, "Q4_0": 23.6, "Q3_K_M": 13.4,
             "Q2_K": 41.5}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples the resident set size every 50 ms while active."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def _growth(row: dict) -> str:
    """RSS growth during quantize (the process also holds the FP32 model and its logits for
    the KLD, 3.2 GB at 32 windows); rows saved before it was recorded show their peak."""
    if "rss_growth_mb" in row:
        return f"{row['rss_growth_mb']:.0f}"
    return f"(process peak {row['peak_rss_mb']:.0f})"


def rtn_of(recipe: str) -> str:
    if recipe == "kmeans4":
        return "w4g64"
    if recipe == "w8a8-smooth":
        return "w8a8-static"
    if recipe.startswith("auto:"):
        return "w3g64"
    return recipe.split("-")[0]


def stored_bits(model) -> tuple[float, float]:
    """(bits per quantized linear weight as saved, as held in memory)."""
    from lowbit.nn import QuantizedLinear

    saved = held = weights = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            saved += sum(t.numel() * t.element_size() for t in m.packed_weight().tensors()
                         .values())
            held += m.weight_nbytes()
            weights += m.in_features * m.out_features
    return 8 * saved / max(weights, 1), 8 * held / max(weights, 1)


class Scores:
    """A ``perplexity`` logits hook: NLL, KL and top-1 for the full and llama.cpp protocols."""

    def __init__(self, baseline: dict | None = None, half: int = 256):
        self.base, self.half = baseline, half
        self.keep = baseline is None
        self.windows: dict[int, tuple] = {}
        self.acc = {p: {"nll": 0.0, "kl": 0.0, "top1": 0, "n": 0} for p in ("full", "llama.cpp")}

    def __call__(self, index, logits, targets):
        import torch

        logp = torch.log_softmax(logits.float(), -1)
        nll = -logp.gather(1, targets[:, None]).squeeze(1).double()
        if self.keep:
            self.windows[index] = logp.to(torch.bfloat16)
            kl = torch.zeros_like(nll)
            top1 = torch.ones_like(nll, dtype=torch.bool)
        else:
            base = self.base[index].float()
            kl = (base.exp() * (base - logp)).sum(-1).double()
            top1 = base.argmax(-1) == logp.argmax(-1)
        for proto, sl in (("full", slice(None)), ("llama.cpp", slice(self.half, None))):
            a = self.acc[proto]
            a["nll"] += float(nll[sl].sum())
            a["kl"] += float(kl[sl].sum())
            a["top1"] += int(top1[sl].sum())
            a["n"] += int(nll[sl].numel())

    def result(self) -> dict:
        return {p: {"ppl": math.exp(a["nll"] / a["n"]), "kld": a["kl"] / a["n"],
                    "top1": a["top1"] / a["n"]} for p, a in self.acc.items()}


def score(model, ids, n_windows, baseline=None) -> Scores:
    from lowbit.eval import perplexity

    s = Scores(baseline)
    perplexity(model, ids, window=512, n_windows=n_windows, protocol="full", logits_hook=s)
    return s


def quantize_as(model, name: str, calib) -> None:
    """Quantize ``model`` with recipe ``name`` (``recipe/option+option``: A/B options, see
    the module docstring), the head kept."""
    import lowbit

    key, _, options = name.partition("/")
    options = set(options.split("+")) - {""}
    refine = [int(o[6:]) for o in options if re.fullmatch(r"refine\d+", o)]
    batch = [int(o[5:]) for o in options if re.fullmatch(r"batch\d+", o)]
    unknown = (options - {"f32in", "whole", "torchloops"} - {f"refine{n}" for n in refine}
               - {f"batch{n}" for n in batch})
    if unknown:
        raise SystemExit(f"{name}: options (joined by +) are f32in (block inputs in "
                         f"float32), refine<N> (N rounds of GPTQ refinement; the default "
                         f"is 2), whole (whole blocks per group, not residual branches), "
                         f"torchloops (GPTQ's column loops in torch, not C), batch<N> (N "
                         f"tokens per calibration forward; the default is 1024)")
    recipe = lowbit.Recipe.parse(key).with_keep("lm_head")
    if not options:
        lowbit.quantize(model, recipe, calib, progress=False)
        return
    from lowbit.model.arch import resolve_arch

    gptq = {"native": "torchloops" not in options} | (
        {"refine_passes": refine[0]} if refine else {})
    if recipe.default.algorithm in ("gptq", "gptaq", "awq+gptq"):
        recipe = recipe.with_options(gptq)
    arch = resolve_arch(model)
    if "whole" in options:
        for block in arch.blocks:
            block.branches = []
    extra = {"batch_tokens": batch[0]} if batch else {}
    lowbit.quantize(model, recipe, calib, progress=False, arch=arch,
                    half_inputs="f32in" not in options, **extra)


def run(args) -> list[dict]:
    import torch

    import lowbit
    from lowbit.data import text, tokens

    torch.set_num_threads(args.threads)
    base = lowbit.load_model("smollm2-135m")
    tok = lowbit.load_tokenizer("smollm2-135m")
    ids = tokens("pydoc", tok, count=512 * args.n_windows)
    calib = text("pydoc", tok, tokens=args.calib_tokens, seq_len=512)
    ref = score(base, ids, args.n_windows)
    fp = ref.result()
    print(f"FP32: PPL {fp['full']['ppl']:.3f} (full), {fp['llama.cpp']['ppl']:.3f} (llama.cpp)",
          flush=True)
    rows = []
    for name in args.recipes.split(","):
        model = copy.deepcopy(base)
        t0, c0 = time.perf_counter(), time.process_time()
        with PeakRSS() as mem:
            quantize_as(model, name, calib)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        res = score(model, ids, args.n_windows, ref.windows).result()
        saved, held = stored_bits(model)
        row = {"recipe": name, "resolved": model.lowbit_recipe.name, "bits_saved": saved,
               "bits_memory": held, "quantize_s": seconds, "quantize_cpu_s": cpu,
               "peak_rss_mb": mem.peak, "rss_growth_mb": mem.peak - mem.start,
               "n_windows": args.n_windows, "kernels": model.lowbit_summary.kernels}
        for proto in ("full", "llama.cpp"):
            r = res[proto]
            row[proto] = {**r, "dppl_pct": 100 * (r["ppl"] / fp[proto]["ppl"] - 1),
                          "fp32_ppl": fp[proto]["ppl"]}
        if name.startswith("auto:"):
            row["recipe_json"] = model.lowbit_recipe.to_dict()
        rows.append(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"{name:16s} {saved:5.2f} b/w  dPPL {row['full']['dppl_pct']:+8.2f}%  "
              f"KLD {row['full']['kld']:.4f}  q {seconds:6.1f}s", flush=True)
        del model
    return rows


def table(rows: list[dict], proto: str) -> str:
    by_name = {r["recipe"]: r for r in rows}
    lines = [f"protocol {proto}, {rows[0]['n_windows']} windows x 512",
             "| recipe | bits/w saved | bits/w memory | PPL | dPPL | RTN dPPL (same format) "
             "| KLD | top-1 | quantize s (CPU s) | RSS growth while quantizing, MB |",
             "|" + "---|" * 10]
    for r in rows:
        p = r[proto]
        ref = by_name.get(rtn_of(r["recipe"]))
        beside = f"{ref[proto]['dppl_pct']:+.2f}% ({ref['recipe']})" if ref and ref is not r \
            else "-"
        lines.append(f"| {r['recipe']} | {r['bits_saved']:.2f} | {r['bits_memory']:.2f} | "
                     f"{p['ppl']:.3f} | {p['dppl_pct']:+.2f}% | {beside} | {p['kld']:.4f} | "
                     f"{100 * p['top1']:.1f}% | {r['quantize_s']:.0f} "
                     f"({r.get('quantize_cpu_s', 0):.0f}) | {_growth(r)} |")
    if proto == "llama.cpp":
        lines.append("llama.cpp on the same model (BENCHMARKS.md): " + ", ".join(
            f"{k} {v:+.1f}%" for k, v in LLAMA_CPP.items()))
    return "\n".join(lines)


def memory(args) -> None:
    """Peak RSS of one quantization against the FP32 model's size, in a fresh process."""
    import torch

    import lowbit
    from lowbit.data import text

    torch.set_num_threads(args.threads)
    tok = lowbit.load_tokenizer("smollm2-135m")
    calib = text("pydoc", tok, tokens=args.calib_tokens, seq_len=512)
    r0 = rss_mb()
    model = lowbit.load_model("smollm2-135m")
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    r1 = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakRSS() as mem:
        quantize_as(model, args.memory, calib)
    print(json.dumps({"recipe": args.memory, "calib_tokens": args.calib_tokens,
                      "quantize_s": time.perf_counter() - t0,
                      "quantize_cpu_s": time.process_time() - c0, "fp32_model_mb": model_mb,
                      "rss_before_model_mb": r0, "rss_with_model_mb": r1,
                      "peak_rss_mb": mem.peak,
                      "peak_over_model": (mem.peak - r0) / model_mb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=RECIPES, help="comma-separated recipe names")
    ap.add_argument("--n-windows", type=int, default=32)
    ap.add_argument("--protocol", choices=("full", "llama.cpp", "both"), default="both")
    ap.add_argument("--calib-tokens", type=int, default=128 * 512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append one JSON line per recipe here")
    ap.add_argument("--memory", default=None, metavar="RECIPE",
                    help="only measure peak memory and time of quantizing with RECIPE")
    ap.add_argument("--tables", nargs="+", default=None, metavar="JSONL",
                    help="only print the tables of results saved with --out")
    args = ap.parse_args()
    from lowbit.model.calib_memory import allocator_tuning

    with allocator_tuning():  # as the CLI runs (this process is lowbit's own)
        _main(args)


def _main(args) -> None:
    if args.memory:
        memory(args)
        return
    if args.tables:
        rows = [json.loads(line) for f in args.tables for line in Path(f).read_text()
                .splitlines() if line.strip()]
    else:
        rows = run(args)
    for proto in ("full", "llama.cpp"):
        if args.protocol in (proto, "both"):
            print("\n" + table(rows, proto))


if __name__ == "__main__":
    main()
