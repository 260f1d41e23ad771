"""lowbit's compressed-tensors / GPTQ exports of SmolLM2, read back by transformers alone.

For each recipe: lowbit's own perplexity and KL divergence from the float model (pydoc
text, ``--windows`` windows of 512 tokens, lowbit's "full" protocol), the size on disk of
lowbit's checkpoint and of every format that holds the recipe (compressed-tensors folder,
GPTQ folder, GGUF file), and the perplexity transformers computes on the same windows after
``AutoModelForCausalLM.from_pretrained(folder)`` in a process that never imports lowbit.
The ``-izp`` rows against their float-zero-point twins are the cost of the integer
zero-points these formats need.

    python benchmarks/hf_export.py [--windows 8] [--recipes w8,w4g64-izp,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from lowbit.kernels.cpu import cpu_name

MODEL = "smollm2-135m"
#: SmolLM2's 576-wide inputs take groups of 64 (not 128); "w4g64-sym" is int4 with symmetric
#: groups (compressed-tensors' W4A16), built here: lowbit's grouped presets are asymmetric
RECIPES = ("w8", "fp8", "w8a8-plain", "w4g64-sym", "w4g64", "w4g64-izp", "w4g64-gptq",
           "w4g64-gptq-izp")




def recipe_of(name: str):
    """A recipe name, or lowbit's symmetric int4 groups (compressed-tensors' W4A16)."""
    if name != "w4g64-sym":
        return name
    from lowbit.model import Recipe, Scheme
    from lowbit.model.recipe import HEAD_SCHEME
    from lowbit.model.scheme import Rule
    from lowbit.nn import WeightSpec

    return Recipe(name, Scheme(WeightSpec("int4", "group:64", True, "bf16")),
                  (Rule("lm_head", HEAD_SCHEME, optional=True),))


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_all(model, tok, name: str, out: Path) -> dict:
    """Sizes (bytes) of every format that holds the model, or why it does not."""
    import lowbit
    from lowbit.errors import LowbitError

    targets = {"lowbit": out / f"{name}.lowbit", "compressed-tensors": out / f"{name}.ct",
               "gptq": out / f"{name}.gptq", "gguf": out / f"{name}.gguf"}
    sizes = {}
    for fmt, path in targets.items():
        try:
            if fmt == "lowbit":
                lowbit.save(model, path, overwrite=True, tokenizer=tok)
            else:
                lowbit.export(model, fmt, path, overwrite=True, tokenizer=tok)
            sizes[fmt] = size(path)
        except (LowbitError, ImportError) as exc:
            sizes[fmt] = str(exc).split(";")[0][:90]
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help=f"comma-separated recipes (default {','.join(RECIPES)})")
    p.add_argument("--calibration-tokens", type=int, default=16384,
                   help="calibration tokens for GPTQ recipes (default 16384)")
    p.add_argument("--out", default="/tmp/lowbit-hf-export", help="folder for the exports")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    import torch

    import lowbit
    from lowbit.eval import evaluate
    from lowbit.export.hf_score import score_folders

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    tok = lowbit.load_tokenizer(MODEL)
    baseline = lowbit.load_model(MODEL)
    n, window = args.windows, 512
    ids = lowbit.data.tokens("pydoc", tok)[: n * window]
    rows = {}
    for name in args.recipes.split(","):
        t0 = time.perf_counter()
        model = lowbit.load_model(MODEL)
        recipe = recipe_of(name)
        calibration = None
        if "gptq" in name:
            calibration = lowbit.data.text("default", tok, tokens=args.calibration_tokens)
        lowbit.quantize(model, recipe, calibration)
        ev = evaluate(model, tok, baseline=baseline, window=window, n_windows=n, speed=False)
        rows[name] = {"ppl": ev["ppl"], "kld": ev["kld_mean"], "base_ppl": ev["baseline_ppl"],
                      "sizes": export_all(model, tok, name, out)}
        print(f"  {name}: lowbit PPL {ev['ppl']:.3f}, KLD {ev['kld_mean']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del model
    folders = [out / f"{name}.ct" for name in rows if (out / f"{name}.ct").is_dir()]
    t0 = time.perf_counter()
    scores = score_folders(folders, ids.view(n, window).tolist())
    print(f"  transformers scored {len(folders)} folders in {time.perf_counter() - t0:.0f} s")
    for name, row in rows.items():
        row["transformers"] = scores.get(str(out / f"{name}.ct"))
    report(rows, n, window)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _mib(value) -> str:
    return f"{value / 2**20:7.1f}" if isinstance(value, int) else "      -"


def report(rows: dict, n: int, window: int) -> None:
    base = next(iter(rows.values()))["base_ppl"]
    print(f"\nSmolLM2-135M, pydoc {n}x{window} tokens, float PPL {base:.3f}")
    print(f"{'recipe':16} {'lowbit PPL':>10} {'KLD':>7} {'transformers PPL':>16} {'diff':>7}  "
          f"{'MiB: lowbit':>11} {'c-tensors':>9} {'gptq':>7} {'gguf':>7}")
    for name, row in rows.items():
        hf, s = row["transformers"], row["sizes"]
        if isinstance(hf, dict):
            hf_text = f"{hf['ppl']:16.3f} {100 * (hf['ppl'] / row['ppl'] - 1):+6.2f}%"
        else:
            hf_text = f"{'-':>16} {'-':>7}"
        print(f"{name:16} {row['ppl']:10.3f} {row['kld']:7.4f} {hf_text}  "
              f"{_mib(s['lowbit']):>11} {_mib(s['compressed-tensors']):>9} "
              f"{_mib(s['gptq']):>7} {_mib(s['gguf']):>7}")
    print("\nnot exported / not loaded:")
    for name, row in rows.items():
        for fmt, value in row["sizes"].items():
            if isinstance(value, str):
                print(f"  {name} -> {fmt}: {value}")
        if isinstance(row["transformers"], str):
            print(f"  {name} in transformers: {row['transformers']}")
    for name, row in rows.items():
        plain = name.removesuffix("-izp")
        if name.endswith("-izp") and plain in rows:
            twin = rows[plain]
            print(f"integer zero-points, {name} vs {plain}: PPL {row['ppl']:.3f} vs "
                  f"{twin['ppl']:.3f} ({100 * (row['ppl'] / twin['ppl'] - 1):+.2f}%), KLD "
                  f"{row['kld']:.4f} vs {twin['kld']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
