"""Does calibration generalize? In-domain vs held-out KLD of calibrated recipes on SmolLM2-135M.

Each recipe is quantized exactly as ``lowbit quantize`` does by default (``Recipe.parse`` of
the name, so below 6 bits the head is int8; ``calibration_batches`` with
``--calib-tokens`` tokens of the calibration text; ``allocator_tuning``), once per
calibration text of ``--calibration`` (``default``: the mix of pydoc past token 20000,
stdlib docstrings and stdlib code; ``pydoc``: pydoc only, the old default; ``generated``:
windows sampled from the FP32 model itself, ``lowbit.data.generated``, after LLM-QAT;
any mix ``lowbit quantize --calibration`` takes, ``TEXT+PART@F``: a share ``F`` of the
windows from ``PART``, spread evenly among windows of ``TEXT``, e.g.
``default+generated@0.25``; here ``PART`` may also be ``email-tail`` or ``idle-news-tail``,
that held-out text from token 16384 on, past every evaluation window: a user adding a
little of their own kind of text). Each model is
then scored on the first ``--n-windows`` x 512 tokens of every text of ``--texts``: pydoc
(in-domain: the same kind of text as pydoc calibration, never the same tokens) and the
held-out texts ``idle-news`` and ``email`` (``lowbit.data.sources``; calibration never
reads them). One forward per window gives both protocols: ``full`` (every predicted token)
and ``llama.cpp`` (the second half of each window, ``llama-perplexity -c 512``).

Reported per text and protocol: PPL, dPPL vs FP32, mean KL(FP32 || model), top-1
agreement; and the out-of-domain / in-domain ratio ``KLD(text) / KLD(pydoc)``. RTN rows
(``w4g128``, ``w8``) read no data: they run once, as the uncalibrated references. For comparison,
llama.cpp's uncalibrated Q4_K_M on the same model moves 0.056 -> 0.069 (about 1.2x).

Recipe options after ``/``, joined by ``+``: ``head=<recipe|keep|same>`` (the head's scheme:
another recipe's default, kept in float, or the body's), ``damp=<float>`` (GPTQ's
``percdamp``, default 0.01), ``refine=<int>`` (GPTQ refinement rounds, default 2),
``shrink=<float>`` (GPTQ's ``hessian_shrink``: its Hessian toward the diagonal).

Run (one heavy job at a time; GPTQ ~2-3 min per recipe on 2 cores, GPTAQ ~5):
  .venv/bin/python benchmarks/calibration_domains.py --json-out docs/calibration_domains.json
  .venv/bin/python benchmarks/calibration_domains.py --recipes w4g128/head=keep,\\
      w4g128/head=w6g64,w4g128/head=same --json-out x.json --append   # the head's format
  .venv/bin/python benchmarks/calibration_domains.py --recipes w4g64-gptq-rot --calibration \
      generated,default+generated@0.25 --json-out x.json --append   # self-generated text
  .venv/bin/python benchmarks/calibration_domains.py --recipes w4g64-gptq-rot --calibration \
      default+email-tail@0.25 --json-out x.json --append   # a little of the user's text
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from lowbit.kernels.cpu import cpu_line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from algorithms import Scores, stored_bits  # noqa: E402  (a sibling benchmark script)

RECIPES = "w4g64-gptq-rot,w4g128,w4g128-gptq,w8,w4g128-awq,w3g64-gptaq-rot"
TEXTS = "pydoc,idle-news,email"




def make_recipe(name: str):
    """``Recipe.parse`` of ``name`` before ``/``, with the head option applied."""
    import lowbit
    from lowbit.model.recipe import Rule

    key, _, options = name.partition("/")
    opts = dict(o.split("=", 1) for o in options.split("+") if o)
    unknown = set(opts) - {"head", "damp", "refine", "shrink"}
    if unknown or any("=" not in o for o in options.split("+") if o):
        raise SystemExit(f"{name}: options are head=<recipe|keep|same>, damp=<float>, "
                         f"refine=<int>, shrink=<float>, joined by '+'")
    recipe = lowbit.Recipe.parse(key)
    head = opts.get("head")
    if head == "keep":
        recipe = recipe.with_keep("lm_head")
    elif head == "same":
        recipe = replace(recipe, rules=tuple(r for r in recipe.rules if r.pattern != "lm_head"))
    elif head:
        rules = tuple(r for r in recipe.rules if r.pattern != "lm_head")
        scheme = lowbit.Recipe.parse(head).default
        if scheme.algorithm != "rtn" and not recipe.needs_calibration:
            raise SystemExit(f"{name}: a calibrated head needs a calibrated recipe")
        recipe = replace(recipe, rules=(Rule("lm_head", scheme, optional=True),) + rules)
    return recipe, opts


def quantize_as_cli(model, tok, name: str, calibration: str, calib_tokens: int) -> None:
    import lowbit
    from lowbit.cli.common import calibration_batches

    recipe, opts = make_recipe(name)
    calib = None
    if recipe.needs_calibration:
        calib = calibration_batches(tok, resolve_tails(calibration, tok), calib_tokens,
                                    model=model)
    fields = {"damp": ("percdamp", float), "refine": ("refine_passes", int),
              "shrink": ("hessian_shrink", float)}
    gptq = {fields[k][0]: fields[k][1](v) for k, v in opts.items() if k in fields}
    if not gptq:
        lowbit.quantize(model, recipe, calib, progress=False)
        return
    lowbit.quantize(model, recipe.with_options(gptq), calib, progress=False)


#: where a held-out text's ``-tail`` calibration file starts (past every evaluation window)
TAIL_OFFSET = 16384


def resolve_tails(spec: str, tok) -> str:
    """``NAME-tail`` in a calibration spec (``default+email-tail@0.25``) -> a file of that
    held-out text from token ``TAIL_OFFSET`` on: "bring a little of your own text", with
    the evaluation windows (the first ``--n-windows`` x 512 tokens) never calibrated on."""
    import tempfile

    from lowbit.data import HELD_OUT, tokens

    def tail(m: re.Match) -> str:
        path = Path(tempfile.gettempdir()) / f"lowbit-calibration-{m[1]}-tail-{TAIL_OFFSET}.txt"
        if not path.is_file():  # SmolLM2's tokens decoded: the text past the offset
            ids = tokens(m[1], tok, offset=TAIL_OFFSET)
            part = path.with_suffix(".part")
            part.write_text(tok.decode(ids.tolist()), encoding="utf-8")
            part.replace(path)
        return str(path)

    return re.sub(rf"({'|'.join(map(re.escape, HELD_OUT))})-tail", tail, spec)


def score(model, ids, n_windows, baseline=None) -> Scores:
    from lowbit.eval import perplexity

    s = Scores(baseline)
    perplexity(model, ids, window=512, n_windows=n_windows, protocol="full", logits_hook=s)
    return s


def _ratios(texts: dict) -> dict:
    """KLD(text) / KLD(pydoc) per held-out text and protocol."""
    ind = texts.get("pydoc")
    if ind is None:
        return {}
    return {t: {p: r[p]["kld"] / max(ind[p]["kld"], 1e-12) for p in ("full", "llama.cpp")}
            for t, r in texts.items() if t != "pydoc"}


def run(args) -> dict:
    import torch

    import lowbit
    from lowbit.data import tokens
    from lowbit.eval.size import model_size

    torch.set_num_threads(args.threads)
    base = lowbit.load_model("smollm2-135m")
    tok = lowbit.load_tokenizer("smollm2-135m")
    texts = [t for t in args.texts.split(",") if t]
    ids = {t: tokens(t, tok, count=512 * args.n_windows) for t in texts}
    refs, fp32 = {}, {}
    for t in texts:
        cache = Path(args.baseline_cache) / f"{t}-{args.n_windows}.pt" if args.baseline_cache \
            else None
        if cache and cache.exists():
            refs[t] = Scores(None)
            refs[t].windows, refs[t].acc = torch.load(cache)
        else:
            refs[t] = score(base, ids[t], args.n_windows)
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save((refs[t].windows, refs[t].acc), cache)
        fp32[t] = {p: r["ppl"] for p, r in refs[t].result().items()}
        print(f"FP32 {t:10s} PPL {fp32[t]['full']:.3f} full, {fp32[t]['llama.cpp']:.3f} "
              f"llama.cpp", flush=True)
    out = {"commands": [" ".join(shlex.quote(a) for a in ["python"] + sys.argv)],
           "cpu": cpu_line(), "model": "smollm2-135m (SmolLM2-135M-Instruct)",
           "threads": args.threads, "n_windows": args.n_windows, "window": 512,
           "calib_tokens": args.calib_tokens, "texts": texts, "fp32_ppl": fp32, "rows": []}
    path = Path(args.json_out) if args.json_out else None
    if path and args.append and path.exists():
        old = json.loads(path.read_text())
        out["rows"], out["commands"] = old["rows"], old.get("commands", []) + out["commands"]
        for r in out["rows"]:  # rows from before calib_tokens was kept per row
            r.setdefault("calib_tokens", old["calib_tokens"])
        out["calib_tokens"] = old["calib_tokens"]  # the first run's; rows carry their own
    done = {(r["recipe"], r["calibration"], r["calib_tokens"]) for r in out["rows"]}
    jobs = [(r, c) for r in args.recipes.split(",") if r
            for c in (args.calibration.split(",") if make_recipe(r)[0].needs_calibration
                      else ["none"])]
    for name, calibration in jobs:
        if (name, calibration, args.calib_tokens) in done:
            continue
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        quantize_as_cli(model, tok, name, calibration, args.calib_tokens)
        seconds = time.perf_counter() - t0
        row = {"recipe": name, "calibration": calibration, "calib_tokens": args.calib_tokens,
               "resolved": model.lowbit_recipe.to_dict(), "quantize_s": seconds,
               "bits_saved": stored_bits(model)[0], **model_size(model).to_dict(), "texts": {}}
        for t in texts:
            res = score(model, ids[t], args.n_windows, refs[t].windows).result()
            row["texts"][t] = {p: {**r, "dppl_pct": 100 * (r["ppl"] / fp32[t][p] - 1)}
                               for p, r in res.items()}
        row["ood_over_id_kld"] = _ratios(row["texts"])
        out["rows"].append(row)
        print(line(row), flush=True)
        if path:
            path.write_text(json.dumps(out, indent=1) + "\n")
        del model
    return out


def line(row: dict) -> str:
    cells = [f"{row['recipe']:28s} {row['calibration']:7s} {row['calib_tokens']} tok "
             f"{row['bits_saved']:5.2f} b/w"]
    for t, r in row["texts"].items():
        cells.append(f"{t} KLD {r['llama.cpp']['kld']:.4f}/{r['full']['kld']:.4f}")
    for t, r in row["ood_over_id_kld"].items():
        cells.append(f"{t}/pydoc {r['llama.cpp']:.2f}x")
    return "  ".join(cells) + f"  q {row['quantize_s']:.0f}s"


def table(out: dict, proto: str) -> str:
    texts = out["texts"]
    held = [t for t in texts if t != "pydoc"]
    head = ["recipe", "calibration", "tokens", "bits/w"] \
        + [f"{t} dPPL / KLD / top-1" for t in texts] + [f"{t}/pydoc KLD" for t in held]
    lines = [f"protocol {proto}, {out['n_windows']} windows x 512, tokens: calibration "
             f"tokens of each row; {out['cpu']}", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in out["rows"]:
        tokens = r.get("calib_tokens", out["calib_tokens"])
        cells = [r["recipe"], r["calibration"], str(tokens), f"{r['bits_saved']:.2f}"]
        for t in texts:
            p = r["texts"][t][proto]
            cells.append(f"{p['dppl_pct']:+.2f}% / {p['kld']:.4f} / {100 * p['top1']:.1f}%")
        cells += [f"{r['ood_over_id_kld'][t][proto]:.2f}x" for t in held]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=RECIPES, help="comma-separated, in run order (options "
                    "after '/': see the module docstring); those that read no data run once")
    ap.add_argument("--calibration", default="default,pydoc",
                    help="calibration texts to compare (built-in names or files)")
    ap.add_argument("--texts", default=TEXTS, help="evaluation texts; 'pydoc' is in-domain")
    ap.add_argument("--n-windows", type=int, default=16)
    ap.add_argument("--calib-tokens", type=int, default=16384,
                    help="what `lowbit quantize` uses by default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", default=None, help="write results here after each row")
    ap.add_argument("--baseline-cache", default=None, metavar="DIR",
                    help="keep the FP32 log-probabilities here between runs (bf16, 0.4 GB per "
                    "text at 8 windows)")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --json-out and skip those recipes")
    ap.add_argument("--tables", default=None, metavar="JSON",
                    help="only print the tables of a saved --json-out file")
    args = ap.parse_args()
    if args.tables:
        out = json.loads(Path(args.tables).read_text())
    else:
        if re.search(r"(^|,)\s*($|,)", args.texts):
            raise SystemExit("--texts has an empty name")
        from lowbit.model.calib_memory import allocator_tuning

        print(f"CPU: {cpu_line()}\ncommand: {' '.join(sys.argv)}", flush=True)
        with allocator_tuning():  # as the CLI runs
            out = run(args)
    for proto in ("llama.cpp", "full"):
        print("\n" + table(out, proto))


if __name__ == "__main__":
    main()
