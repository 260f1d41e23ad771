"""lowbit's static int8 QDQ ONNX export in ONNX Runtime: the digits CNN and MiniLM.

    python benchmarks/onnx_qdq.py --out qdq.json     # a few minutes on 2 cores

What it measures (``lowbit.export.onnx_qdq``: QuantizeLinear / DequantizeLinear around each
quantized layer with lowbit's own calibrated activation scales, int8 weight codes and
per-channel scales, so ONNX Runtime runs lowbit's quantization):

- digits CNN (``benchmarks/digits_qat.py``'s, trained here in FP32 on scikit-learn's digits):
  test accuracy of FP32, of lowbit ``w8a8-static`` in lowbit and of the same model in ORT
  (QDQ), and how often lowbit and ORT predict the same class. Two quantized variants:
  ``lowbit.quantize`` (it quantizes the Linear layers: calibrated int8 inputs, int8
  weights) and the same plus int8 per-channel conv weights (``QuantizedConv2d``; lowbit has
  no int8-activation convolution, so the convs stay float-compute in both runtimes);
- MiniLM (``minilm-l6``, all-MiniLM-L6-v2): cosine similarity of mean-pooled sentence
  embeddings, ORT QDQ vs lowbit FP32 (and lowbit w8a8-static vs FP32, ORT vs lowbit
  w8a8-static), on sentences of lowbit's bundled pydoc text, calibrated on other sentences;
  ORT latency of the FP32 export vs the QDQ export (batch 1 and a padded batch), file sizes,
  and the op types ORT's optimizer turned the QDQ graph into (which kernels ran). query, key
  and value read one input with one calibrated scale, so ORT merges their Q/DQ pair and,
  its DQ having three consumers, keeps those three matmuls in float (lowbit's codes still).
The quantized models use the ``w8a8-static`` preset with float32 compute, so lowbit's and
ORT's numbers differ only by float summation order (see tests/export/test_onnx_qdq.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lowbit.kernels.cpu import cpu_name

ROOT = Path(__file__).resolve().parent




def recipe():
    from lowbit.model.recipe import PRESETS

    return replace(PRESETS["w8a8-static"], compute_dtype="fp32")


def session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path / "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])


def ops_after_optimization(path: Path, threads: int) -> dict[str, int]:
    """Op types of the graph ORT runs (after its QDQ fusions), quantized ones first."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(path, threads, out)
        ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    keys = [k for k in ops if "Quant" in k or "Integer" in k or k.startswith("QLinear")
            or k in ("MatMul", "Conv", "Gemm", "FusedMatMul", "FusedConv", "FusedGemm")]
    return {k: ops[k] for k in sorted(keys)}


# -- digits ----------------------------------------------------------------------------
def digits(args, work: Path) -> dict:
    import lowbit
    from lowbit.export.onnx_qdq import export_qdq
    from lowbit.nn import QuantizedConv2d, WeightSpec

    sys.path.insert(0, str(ROOT))
    from digits_qat import batches, load_digits, train_fp32

    train_set, (x_test, y_test) = load_digits()
    t0 = time.perf_counter()
    base = train_fp32(train_set, args.steps)
    print(f"digits CNN trained in FP32 ({args.steps} steps, {time.perf_counter() - t0:.0f} s); "
          f"{len(y_test)} test images", flush=True)
    calib = [x for x, _ in batches(train_set, args.calib_batches, seed=2)]

    def acc(logits) -> float:
        return float((torch.as_tensor(logits).argmax(-1) == y_test).float().mean())

    def ort_logits(model, name: str):
        report = export_qdq(model, work / name, example_inputs=x_test[:2])
        return session(work / name, args.threads).run(None, {"input": x_test.numpy()})[0], \
            report

    with torch.no_grad():
        fp32 = base(x_test)
    ort_fp32, _ = ort_logits(base, "digits-fp32")
    result = {"test_images": len(y_test), "fp32_torch": acc(fp32), "fp32_ort": acc(ort_fp32)}
    spec = WeightSpec("int8", "channel", True, "fp32")
    for variant in ("linears", "linears+conv-weights"):
        model = copy.deepcopy(base)
        if variant != "linears":
            for i in (0, 3):
                model[i] = QuantizedConv2d.from_float(model[i], spec)
        lowbit.quantize(model, recipe(), calib, progress=False)
        with torch.no_grad():
            ours = model(x_test)
        theirs, report = ort_logits(model, f"digits-{variant}")
        result[variant] = {
            "lowbit": acc(ours), "ort_qdq": acc(theirs),
            "same_prediction": float((ours.argmax(-1).numpy() == theirs.argmax(-1)).mean()),
            "max_logit_diff": float(np.abs(ours.numpy() - theirs).max()),
            "static_layers": report.static, "weight_only_layers": report.weight_only,
            "float_layers": report.float_layers}
    print("\n| digits CNN | accuracy % | ORT QDQ accuracy % | same prediction % | "
          "max logit diff |\n|---|---:|---:|---:|---:|")
    print(f"| FP32 (torch / ORT) | {100 * result['fp32_torch']:.2f} | "
          f"{100 * result['fp32_ort']:.2f} (ORT FP32) | | |")
    for variant in ("linears", "linears+conv-weights"):
        r = result[variant]
        print(f"| w8a8-static, {variant} | {100 * r['lowbit']:.2f} | {100 * r['ort_qdq']:.2f} | "
              f"{100 * r['same_prediction']:.2f} | {r['max_logit_diff']:.2e} |")
    return result


# -- MiniLM ----------------------------------------------------------------------------
def split_sentences(count: int, skip: int = 0) -> list[str]:
    """Prose sentences of lowbit's bundled pydoc text, evenly spaced, 40-300 characters."""
    from lowbit.data.corpus import corpus_text

    text = " ".join(corpus_text("pydoc").split())
    found = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
             if 40 <= len(s) <= 300 and sum(c.isalpha() or c == " " for c in s) >= 0.85 * len(s)]
    step = max(1, len(found) // (2 * count))
    return found[skip::step][:count]


def ort_embed(sess, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled ``last_hidden_state`` from ORT, batched as ``lowbit.eval.embed`` does."""
    encoded = [tokenizer(t, truncation=True, max_length=128)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    out = None
    for first in range(0, len(order), batch_size):
        idx = order[first: first + batch_size]
        ids, mask = pad([encoded[i] for i in idx], tokenizer.pad_token_id or 0)
        hidden = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        m = mask[..., None].astype(np.float32)
        pooled = torch.from_numpy((hidden * m).sum(1) / np.maximum(m.sum(1), 1))
        out = torch.empty(len(texts), pooled.shape[-1]) if out is None else out
        out[idx] = pooled
    return out


def pad(rows: list[list[int]], value: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), value, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def cosine(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"mean": float(cos.mean()), "min": float(cos.min()),
            "p01": float(torch.quantile(cos, 0.01))}


def latency_ms(sess, feeds: dict, budget_s: float) -> float:
    sess.run(None, feeds)
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 200):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def minilm(args, work: Path) -> dict:
    import lowbit
    from lowbit.eval.embeddings import embed
    from lowbit.export.onnx_qdq import export_qdq

    tok = lowbit.load_tokenizer("minilm-l6")
    texts = split_sentences(args.sentences)
    calib_texts = split_sentences(args.calib_batches * 16, skip=1)
    calib = []
    for i in range(0, len(calib_texts), 16):
        ids, mask = pad([tok(t, truncation=True, max_length=128)["input_ids"]
                         for t in calib_texts[i:i + 16]], tok.pad_token_id or 0)
        calib.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    fp32 = lowbit.load_model("minilm-l6").float().eval()
    base = embed(fp32, tok, texts)
    r_fp32 = export_qdq(fp32, work / "minilm-fp32", tokenizer=tok)
    model = lowbit.quantize(lowbit.load_model("minilm-l6").float().eval(), recipe(), calib,
                            progress=False)
    ours = embed(model, tok, texts)
    r_qdq = export_qdq(model, work / "minilm-qdq", tokenizer=tok)
    s_fp32, s_qdq = (session(work / n, args.threads) for n in ("minilm-fp32", "minilm-qdq"))
    ort_fp32, ort_qdq = ort_embed(s_fp32, tok, texts), ort_embed(s_qdq, tok, texts)
    batch = pad([tok(t)["input_ids"] for t in texts[:args.batch]], tok.pad_token_id or 0)
    feeds = {1: {"input_ids": batch[0][:1, :int(batch[1][0].sum())],
                 "attention_mask": batch[1][:1, :int(batch[1][0].sum())]},
             args.batch: {"input_ids": batch[0], "attention_mask": batch[1]}}
    lat = {f"batch{b}x{f['input_ids'].shape[1]}": {
        "fp32_ms": latency_ms(s_fp32, f, args.seconds),
        "qdq_ms": latency_ms(s_qdq, f, args.seconds)} for b, f in feeds.items()}
    result = {"sentences": len(texts), "calibration_sentences": len(calib_texts),
              "cosine_ort_qdq_vs_fp32": cosine(ort_qdq, base),
              "cosine_lowbit_w8a8_vs_fp32": cosine(ours, base),
              "cosine_ort_qdq_vs_lowbit_w8a8": cosine(ort_qdq, ours),
              "cosine_ort_fp32_vs_fp32": cosine(ort_fp32, base),
              "latency": lat, "bytes": {"fp32": r_fp32.onnx_bytes, "qdq": r_qdq.onnx_bytes},
              "static_layers": len(r_qdq.static), "unused_layers": r_qdq.unused,
              "ort_ops_qdq": ops_after_optimization(work / "minilm-qdq", args.threads)}
    print(f"\nMiniLM-L6: {len(texts)} sentences of pydoc, mean-pooled embeddings; "
          f"{len(r_qdq.static)} static int8 layers (unused: {', '.join(r_qdq.unused) or '-'})")
    print("| cosine | mean | min | 1st pct |\n|---|---:|---:|---:|")
    for key in ("cosine_ort_qdq_vs_fp32", "cosine_lowbit_w8a8_vs_fp32",
                "cosine_ort_qdq_vs_lowbit_w8a8", "cosine_ort_fp32_vs_fp32"):
        c = result[key]
        print(f"| {key.removeprefix('cosine_')} | {c['mean']:.5f} | {c['min']:.5f} | "
              f"{c['p01']:.5f} |")
    print(f"| ORT latency ({args.threads} threads) | FP32 ms | QDQ ms | speed-up |\n"
          "|---|---:|---:|---:|")
    for shape, t in lat.items():
        print(f"| {shape} | {t['fp32_ms']:.2f} | {t['qdq_ms']:.2f} | "
              f"{t['fp32_ms'] / t['qdq_ms']:.2f}x |")
    print(f"model.onnx: FP32 {r_fp32.onnx_bytes / 2**20:.1f} MiB, QDQ "
          f"{r_qdq.onnx_bytes / 2**20:.1f} MiB; ORT ran (QDQ graph after its fusions): "
          + ", ".join(f"{k} {v}" for k, v in result["ort_ops_qdq"].items()))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="FP32 training steps of the CNN")
    p.add_argument("--calib-batches", type=int, default=8,
                   help="calibration batches (64 images / 16 sentences each)")
    p.add_argument("--sentences", type=int, default=300, help="MiniLM evaluation sentences")
    p.add_argument("--batch", type=int, default=32, help="MiniLM latency batch size")
    p.add_argument("--seconds", type=float, default=3.0, help="time per latency measurement")
    p.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    p.add_argument("--only", choices=("digits", "minilm"), help="run one of the two")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}", flush=True)
    result = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "digits"):
            result["digits"] = digits(args, Path(tmp))
        if args.only in (None, "minilm"):
            result["minilm"] = minilm(args, Path(tmp))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
