"""How far GPTQ's gain carries to text calibration never saw, layer by layer, without the
noise of whole-model scores.

GPTQ (Frantar et al., 2023) minimises ``||(W - Q) X||^2`` over the calibration inputs ``X``,
i.e. ``tr(D H D^T)`` with ``D = W - Q`` and ``H = X^T X``. Whether the solution is good for
another text is the same error under that text's ``H``. For every linear of the chosen
blocks of SmolLM2-135M this script:

- collects the input Hessian of each evaluation text (``--texts``: the first
  ``--n-windows`` x 512 tokens, the windows ``calibration_domains.py`` scores) and of each
  calibration text (``--calibrations``: anything ``lowbit quantize --calibration`` takes,
  plus ``email-tail`` / ``idle-news-tail`` as in ``calibration_domains.py``), from the FP32
  model's own activations (one pass; the real pipeline feeds each block the quantized blocks
  before it, so this isolates the layer);
- solves the layer with the recipe's weight format and GPTQ options as ``lowbit quantize``
  runs them (act-order, 2 rounds of refinement, Hessian shrink 0.3; rotated inputs for
  ``-rot``), once per calibration text, and rounds to nearest for reference (``rtn``);
- reports the relative output error ``tr(D H_t D^T) / tr(W H_t W^T)`` under each evaluation
  text ``t``, as a geometric mean over the layers (x 1000), and each calibration's mean
  error ratio to ``default``'s.

Whole-model KLD (``calibration_domains.py``) is what a user sees; it also moves by up to
about 15% between runs that differ only in float rounding, while these per-layer errors are
deterministic, so small effects of the calibration text show here first.

    .venv/bin/python benchmarks/calibration_transfer.py --out docs/calibration_transfer.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_domains import resolve_tails  # noqa: E402  (a sibling benchmark script)

CALIBRATIONS = ("default,pydoc,default+generated@0.25,default+idle-news-tail@0.25,"
                "default+email-tail@0.25")


def hessians(model, batches, names: set[str]) -> dict[str, torch.Tensor]:
    """``X^T X / tokens`` (float64) of the inputs of the linears ``names`` over ``batches``."""
    out: dict[str, torch.Tensor] = {}
    count = [0]
    hooks = []
    for name, mod in model.named_modules():
        if name in names:
            def hook(mod, inp, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                out[name] = out.get(name, 0) + x.T @ x
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
                count[0] += b.numel()
    finally:
        for h in hooks:
            h.remove()
    return {k: v / count[0] for k, v in out.items()}


def relative_error(D: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    return float(torch.einsum("ij,jk,ik->", D, H, D) / torch.einsum("ij,jk,ik->", W, H, W))


def solve(W: torch.Tensor, H: torch.Tensor | None, spec, options: dict) -> torch.Tensor:
    """The dequantized weight: GPTQ with ``options`` on ``H``, or rounding (``H`` None)."""
    from lowbit.algorithms.gptq_solver import gptq

    if H is None:  # identity Hessian: no error feedback, plain rounding in GPTQ's loop
        return gptq(W, torch.eye(W.shape[1]), spec).dequantize()
    return gptq(W, H.float().clone(), spec, **options).dequantize()


def run(args) -> dict:
    import lowbit
    from lowbit.algorithms.gptq_solver import RECIPE_DEFAULTS
    from lowbit.algorithms.stats import rotate_weight_and_hessian
    from lowbit.cli.common import calibration_batches
    from lowbit.data import tokens
    from lowbit.kernels.cpu import cpu_line

    torch.set_num_threads(args.threads)
    model = lowbit.load_model("smollm2-135m").eval()
    tok = lowbit.load_tokenizer("smollm2-135m")
    spec = lowbit.Recipe.parse(args.recipe).default.weight
    options = dict(RECIPE_DEFAULTS)
    blocks = [int(b) for b in args.blocks.split(",")]
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and n.startswith("model.layers.") and int(n.split(".")[2]) in blocks}
    texts = args.texts.split(",")
    evals = {t: hessians(model, tokens(t, tok, count=512 * args.n_windows).view(-1, 1, 512),
                         names) for t in texts}
    calibs = {}
    for c in args.calibrations.split(","):
        batches = calibration_batches(tok, resolve_tails(c, tok), args.calib_tokens, model=model)
        calibs[c] = hessians(model, batches, names)
    rows: dict[str, dict[str, list[float]]] = {c: {t: [] for t in texts}
                                               for c in ["rtn", *calibs]}
    modules = dict(model.named_modules())
    for name in sorted(names, key=lambda n: (int(n.split(".")[2]), n)):
        W = modules[name].weight.detach().float()
        rot = spec.rotation

        def rotated(H, W=W, rot=rot):
            return rotate_weight_and_hessian(W, H.float(), rot) if rot else (W, H.float())

        Wr = rotated(evals[texts[0]][name])[0]
        Ht = {t: rotated(evals[t][name])[1].double() for t in texts}
        for c in rows:
            Q = solve(Wr, None if c == "rtn" else rotated(calibs[c][name])[1], spec, options)
            D = (Wr - Q).double()
            for t in texts:
                rows[c][t].append(relative_error(D, Wr.double(), Ht[t]))
        print(f"{name.removeprefix('model.layers.')}: " + "  ".join(
            f"{c}=" + "/".join(f"{rows[c][t][-1] * 1e3:.2f}" for t in texts) for c in rows),
            flush=True)
    geo = {c: {t: math.exp(sum(map(math.log, v)) / len(v)) for t, v in r.items()}
           for c, r in rows.items()}
    base = geo.get("default")
    report = {"command": "python benchmarks/calibration_transfer.py " +
                         " ".join(map(shlex.quote, sys.argv[1:])),
              "cpu": cpu_line(), "model": "smollm2-135m", "recipe": args.recipe,
              "gptq_options": options, "blocks": blocks, "layers": len(names),
              "n_windows": args.n_windows, "calib_tokens": args.calib_tokens, "texts": texts,
              "relative_error_geomean": geo,
              "vs_default": {c: {t: g[t] / base[t] for t in texts} for c, g in geo.items()}
              if base else None}
    print(f"\n{args.recipe}, {len(names)} linears of blocks {args.blocks}: relative output "
          f"error x 1000 (geometric mean) under each text's inputs" +
          (", and / default's" if base else ""))
    print(f"{'calibration':32s} " + " ".join(f"{t:>16s}" for t in texts))
    for c, g in geo.items():
        cells = [f"{g[t] * 1e3:7.3f}" + (f" ({g[t] / base[t]:.2f}x)" if base else "")
                 for t in texts]
        print(f"{c:32s} " + " ".join(f"{x:>16s}" for x in cells))
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w4g64-gptq-rot", help="whose weight format is solved")
    ap.add_argument("--calibrations", default=CALIBRATIONS,
                    help="calibration texts to compare, comma-separated")
    ap.add_argument("--texts", default="pydoc,idle-news,email")
    ap.add_argument("--blocks", default="3,11,19,27", help="decoder blocks whose linears run")
    ap.add_argument("--n-windows", type=int, default=16)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args(argv)
    report = run(args)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
