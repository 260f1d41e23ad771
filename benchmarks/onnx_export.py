"""SmolLM2 exported to ONNX, run by ONNX Runtime: FP32 graph against lowbit's int4 codes.

One run exports the same model twice with ``lowbit.export.to_onnx.export_onnx``: the float
model (every linear a float32 MatMul) and the model quantized by ``--recipe`` (its layers
``com.microsoft.MatMulNBits`` holding lowbit's codes). For each file, on the CPU
(ORT's CPUExecutionProvider, ``--threads`` intra-op threads):

- prefill: one forward over a ``--prompt``-token prompt (pydoc text), best of
  ``--repeats``, as tokens per second;
- decode: ``--steps`` greedy tokens one at a time through the KV cache after that prompt,
  best of ``--repeats``, as tokens per second;
- size on disk of model.onnx (+ external data);
- perplexity on ``--eval`` pydoc tokens (one window) from ORT's logits, beside lowbit's own
  forward of the same model on the same tokens (float32 activations; its int4 prefill
  kernel multiplies in bf16), and the largest difference between ORT's logits and lowbit's
  (``max_rel_logit_diff``) and lowbit's float32 reference path
  (``max_rel_logit_diff_reference``), relative to the largest logit.
Ratios int4 / FP32 are printed side by side and everything goes to ``--out`` (JSON).

    python benchmarks/onnx_export.py --out /tmp/onnx_bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lowbit.kernels.cpu import cpu_name

MODEL = "smollm2-135m"




def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token negative log-likelihood of ``ids`` [1, T] under ``logits`` [1, T, V]."""
    x = logits[0, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids[0]) - 1), ids[0, 1:]].mean())


def measure(folder: Path, prompt: np.ndarray, steps: int, repeats: int, threads: int,
            eval_ids: np.ndarray) -> dict:
    from lowbit.export.to_onnx import empty_cache, session, step

    t0 = time.perf_counter()
    sess = session(folder, threads=threads)
    load_s = time.perf_counter() - t0
    prefill, decode, tokens = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, cache = step(sess, prompt, empty_cache(sess))
        prefill.append(time.perf_counter() - t0)
        tokens = [int(logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, cache = step(sess, np.array([[tokens[-1]]]), cache)
            tokens.append(int(logits[0, -1].argmax()))
        decode.append(time.perf_counter() - t0)
    logits, _ = step(sess, eval_ids, empty_cache(sess))
    files = [folder / "model.onnx", folder / "model.onnx.data"]
    return {"session_load_s": load_s,
            "prefill_tokens_per_s": prompt.shape[1] / min(prefill),
            "decode_tokens_per_s": steps / min(decode),
            "onnx_bytes": sum(f.stat().st_size for f in files if f.is_file()),
            "ppl_ort": float(np.exp(_nll(logits, eval_ids))),
            "greedy_tokens": tokens, "eval_logits": logits}


def lowbit_reference(model, eval_ids: np.ndarray, ort_logits: np.ndarray) -> dict:
    """lowbit's forward (its fast kernels, float32 activations) and its reference path
    (``QuantizedLinear.reference_forward``: dequantize, float32 matmul) on ``eval_ids``,
    against ORT's logits."""
    import torch

    from lowbit.nn import QuantizedLinear

    ids = torch.from_numpy(eval_ids)
    with torch.no_grad():
        own = model.float()(ids).logits.float().numpy()
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.forward = m.reference_forward  # this benchmark's copy only
        ref = model(ids).logits.float().numpy()
    return {"ppl_lowbit": float(np.exp(_nll(own, eval_ids))),
            "max_rel_logit_diff": float(np.abs(own - ort_logits).max() / np.abs(own).max()),
            "max_rel_logit_diff_reference":
                float(np.abs(ref - ort_logits).max() / np.abs(ref).max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", default=MODEL, help="bundled model or folder (default %(default)s)")
    p.add_argument("--recipe", default="w4g32", help="lowbit recipe of the quantized export")
    p.add_argument("--accuracy-level", type=int, default=None,
                   help="MatMulNBits accuracy_level (0: float32 products, as lowbit; 4: int8 "
                        "activations; default: the exporter's, 0 for 4-bit, 4 for 8-bit)")
    p.add_argument("--prompt", type=int, default=128, help="prefill prompt tokens")
    p.add_argument("--steps", type=int, default=32, help="decode steps with the KV cache")
    p.add_argument("--eval", type=int, default=512, help="tokens of the perplexity window")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    p.add_argument("--threads", type=int, default=2, help="ORT and torch threads")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the ONNX folders go (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    import lowbit
    from lowbit.export.to_onnx import export_onnx

    torch.set_num_threads(args.threads)
    tok = lowbit.load_tokenizer(args.model)
    ids = np.asarray(lowbit.data.tokens("pydoc", tok)[: args.prompt + args.eval],
                     dtype=np.int64)
    prompt, eval_ids = ids[None, : args.prompt], ids[None, args.prompt:]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lowbit_onnx_bench."))
    print(f"CPU: {cpu_name()}; onnxruntime {ort.__version__} CPUExecutionProvider, "
          f"{args.threads} threads; model {args.model}")
    print(f"prefill: one {args.prompt}-token forward; decode: {args.steps} greedy tokens "
          f"through the KV cache; best of {args.repeats}; PPL: {args.eval} pydoc tokens")

    rows = {}
    for name in ("fp32", args.recipe):
        model = lowbit.load_model(args.model).float()
        if name != "fp32":
            model = lowbit.quantize(model, args.recipe).float()
        t0 = time.perf_counter()
        report = export_onnx(model, work / name, tokenizer=tok, overwrite=True,
                             accuracy_level=args.accuracy_level)
        export_s = time.perf_counter() - t0
        row = measure(report.path, prompt, args.steps, args.repeats, args.threads, eval_ids)
        row |= lowbit_reference(model, eval_ids, row.pop("eval_logits"))
        row |= {"export_s": export_s, "ops": {k: v for k, v in report.ops.items()
                                                if "MatMul" in k}, "report": str(report)}
        rows[name] = row
        print(f"  {report}")
        del model

    fp, q = rows["fp32"], rows[args.recipe]
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "onnx_bytes", "ppl_ort",
            "ppl_lowbit", "max_rel_logit_diff", "max_rel_logit_diff_reference")
    print(f"\n{'':30}{'fp32':>12}{args.recipe:>12}{'ratio':>10}")
    for k in keys:
        a, b = fp[k], q[k]
        fmt = (lambda v: f"{v / 2**20:.1f} MiB") if k == "onnx_bytes" else \
            (lambda v: f"{v:.3g}")
        ratio = f"{b / a:.2f}x" if a else "-"
        print(f"{k:30}{fmt(a):>12}{fmt(b):>12}{ratio:>10}")
    same = sum(x == y for x, y in zip(fp["greedy_tokens"], q["greedy_tokens"], strict=True))
    print(f"greedy tokens equal to fp32's: {same}/{len(fp['greedy_tokens'])}")
    if args.out:
        result = {"command": "python benchmarks/onnx_export.py " + " ".join(sys.argv[1:]),
                  "cpu": cpu_name(), "onnxruntime": ort.__version__, "threads": args.threads,
                  "model": args.model, "recipe": args.recipe,
                  "accuracy_level": args.accuracy_level, "prompt_tokens": args.prompt,
                  "decode_steps": args.steps, "eval_tokens": args.eval,
                  "repeats": args.repeats, "rows": rows,
                  "ratios": {k: q[k] / fp[k] for k in keys if fp[k]}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
