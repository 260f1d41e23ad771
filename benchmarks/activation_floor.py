"""How much KL divergence llama.cpp's rounding of the *activations* costs on its own.

llama.cpp's CPU backend rounds the input of every matrix product with a quantized weight:
to Q8_0 (blocks of 32) for Q8_0 / Q4_0 / Q5_0 weights, to Q8_K (blocks of 256) for k-quant
weights (``lowbit.formats.ggml_activations``). A GGUF file's KL divergence to its F32 source
therefore holds that rounding as well as the weights' error. This script measures it with
lowbit's own evaluation (``lowbit eval --protocol llama.cpp --baseline``: ``evaluate`` with
the FP32 model as baseline; windows of 512 tokens, the second half of each scored) of
SmolLM2-135M on pydoc (the calibration domain) and email (held out), ``--windows`` windows
each (16, as docs/gguf_export's ``--chunks 16``), for:

- ``fp32, float act``: the FP32 model itself: what the measurement adds on its own (the
  baseline's log-probabilities are kept in bfloat16, ``eval.compare``);
- ``fp32 + q8_0 act``: FP32 weights, the input of every linear layer of the decoder blocks
  and of the output head rounded to Q8_0 (forward pre-hooks; the embedding lookup as it
  is): the floor of a Q8_0 or Q4_0 file;
- ``fp32 + q8_k act``: FP32 weights, inputs rounded as a k-quant file of this model rounds
  them: Q8_K where a k-quant can hold the layer's rows (a multiple of 256 inputs: only
  ``down_proj``, 1536), Q8_0 elsewhere (576 inputs: llama-quantize writes those layers and
  the head in Q5_0 / Q8_0, whose inputs are Q8_0; Q5_1's Q8_1 rounds the same values);
- ``gguf:q8_0-gptq`` (quantized as ``lowbit quantize`` does: 16384 tokens of the default
  calibration mix) and ``gguf:q8_0`` (round to nearest on Q8_0's grid; llama-quantize's
  Q8_0 file has the same codes but for 0.7% of the values, near-ties it rounds against its
  float32 rather than its float16 scale), each with float and with Q8_0 activations.

The last lines compare the Q8_0 floor with issue 19's target (half of llama.cpp's KLD for
its own Q8_0 file, read from docs/gguf_export.json, as is llama.cpp's KLD of lowbit's
``gguf:q8_0-gptq`` file, which ``gguf:q8_0-gptq + q8_0 act`` should reproduce).

    .venv/bin/python benchmarks/activation_floor.py --json-out docs/activation_floor.json

About 25 minutes on 2 shared cores (GPTQ ~7, the 16 evaluations the rest).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

MODEL = "smollm2-135m"
TEXTS = ("pydoc", "email")
#: docs/gguf_export.json's rows for the files the Q8_0 rows stand for: llama.cpp's own KLD
LLAMA_CPP_ROWS = ("lowbit gguf:q8_0-gptq", "llama-quantize Q8_0")


def linear_names(model) -> list[str]:
    """The matmuls llama.cpp runs on quantized weights: every ``nn.Linear`` (the decoder
    blocks' projections and the head); the embedding is a lookup, not a product."""
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def rounding_for(mode: str, in_features: int):
    """The activation rounding llama.cpp applies before a layer with ``in_features`` inputs."""
    from lowbit.formats.ggml_activations import QK8_K, fake_quantize_q8_0, fake_quantize_q8_k

    if mode == "q8_k" and in_features % QK8_K == 0:
        return fake_quantize_q8_k
    return fake_quantize_q8_0


@contextmanager
def rounded_inputs(model, names: list[str], mode: str | None):
    """Within the block, the inputs of the modules ``names`` are rounded as llama.cpp's
    ``mode`` (``q8_0``, ``q8_k``) activations (``None``: left as they are), and quantized
    layers run their reference path (dequantized weights, float32 matmul), so the numbers
    hold the weights' and the activations' rounding and nothing of a kernel's arithmetic."""
    from lowbit.nn import QuantizedLinear

    handles = []
    for name in names:
        module = model.get_submodule(name)
        fn = rounding_for(mode, module.in_features) if mode else None
        reference = isinstance(module, QuantizedLinear)

        def hook(_module, args, kwargs, fn=fn, reference=reference):
            x = fn(args[0]).to(args[0].dtype) if fn else args[0]
            return (x, *args[1:]), ({**kwargs, "impl": "reference"} if reference else kwargs)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _models(calib_tokens: int):
    """(baseline, {name: model}) and the seconds GPTQ took."""
    import lowbit
    from lowbit.cli.common import calibration_batches

    tokenizer = lowbit.load_tokenizer(MODEL)
    baseline = lowbit.load_model(MODEL)
    models = {"fp32": lowbit.load_model(MODEL)}
    seconds = {}
    for recipe in ("gguf:q8_0-gptq", "gguf:q8_0"):
        model = lowbit.load_model(MODEL)
        parsed = lowbit.Recipe.parse(recipe)
        calib = (calibration_batches(tokenizer, None, calib_tokens)
                 if parsed.needs_calibration else None)
        t0 = time.perf_counter()
        lowbit.quantize(model, parsed, calib, progress=False)
        seconds[recipe] = time.perf_counter() - t0
        print(f"{recipe}: quantized in {seconds[recipe]:.0f} s", flush=True)
        models[recipe] = model
    return tokenizer, baseline, models, seconds


#: (row, model, activation rounding)
ROWS = (("fp32, float act", "fp32", None), ("fp32 + q8_0 act", "fp32", "q8_0"),
        ("fp32 + q8_k act", "fp32", "q8_k"),
        ("gguf:q8_0-gptq, float act", "gguf:q8_0-gptq", None),
        ("gguf:q8_0-gptq + q8_0 act", "gguf:q8_0-gptq", "q8_0"),
        ("gguf:q8_0, float act", "gguf:q8_0", None),
        ("gguf:q8_0 + q8_0 act", "gguf:q8_0", "q8_0"))


def _llama_cpp_reference(path: Path) -> dict:
    """llama.cpp's own KLD of the files these rows stand for, from docs/gguf_export.json."""
    if not path.is_file():
        return {}
    rows = {r["row"]: r for r in json.loads(path.read_text())["rows"]}
    return {name: {t: rows[name]["texts"][t]["kld"] for t in TEXTS}
            for name in LLAMA_CPP_ROWS if name in rows}


def floor_check(result: dict) -> dict:
    """Per text: half of llama.cpp's KLD for its own Q8_0 file (issue 19's target) and the
    KLD of FP32 weights with Q8_0 activations (the floor of any Q8_0 file)."""
    reference = result["llama_cpp_kld"].get("llama-quantize Q8_0")
    floor = next(r for r in result["rows"] if r["row"] == "fp32 + q8_0 act")
    if reference is None:
        return {}
    return {t: {"target": reference[t] / 2, "floor": floor["texts"][t]["kld"],
                "floor_above_target": floor["texts"][t]["kld"] > reference[t] / 2}
            for t in TEXTS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16, help="windows of 512 tokens per text")
    p.add_argument("--calib-tokens", type=int, default=16384,
                   help="GPTQ's calibration tokens (lowbit quantize's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", help="write the rows here (e.g. docs/activation_floor.json)")
    args = p.parse_args(argv)

    import torch

    from lowbit.eval import evaluate
    from lowbit.kernels.cpu import cpu_line

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cpu = cpu_line()
    print(f"CPU: {cpu}\nKL(FP32 || model) of SmolLM2-135M, lowbit eval --protocol llama.cpp, "
          f"{args.windows}x512 tokens of {', '.join(TEXTS)}: FP32 weights with llama.cpp's "
          "activation rounding, and Q8_0 weights with float and rounded activations", flush=True)
    tokenizer, baseline, models, quantize_s = _models(args.calib_tokens)
    names = linear_names(baseline)
    rows = [{"row": row, "weights": weights, "activations": act or "float", "texts": {}}
            for row, weights, act in ROWS]
    for text in TEXTS:  # text outermost: the baseline's log-probabilities are computed once
        for row, (_, weights, act) in zip(rows, ROWS, strict=True):
            model = models[weights]
            with rounded_inputs(model, names, act):
                r = evaluate(model, tokenizer, baseline=baseline, data=text, window=512,
                             n_windows=args.windows, protocol="llama.cpp", speed=False)
            row["texts"][text] = {"kld": r["kld_mean"], "kld_p99": r["kld_p99"],
                                  "top1": r["top1_agreement"], "ppl": r["ppl"],
                                  "baseline_ppl": r["baseline_ppl"],
                                  "tokens": r["tokens_scored"]}
            print(f"{text:6s} {row['row']:28s} KLD {r['kld_mean']:.5f}  top-1 "
                  f"{100 * r['top1_agreement']:.2f}%  PPL {r['ppl']:.3f}", flush=True)
    command = ".venv/bin/python benchmarks/activation_floor.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "cpu": cpu, "model": MODEL, "protocol": "llama.cpp",
              "window": 512, "windows": args.windows, "calib_tokens": args.calib_tokens,
              "threads": args.threads, "quantize_s": quantize_s,
              "matmul": "float32; quantized layers by their reference path (dequantized "
                        "weights), activations rounded by lowbit.formats.ggml_activations",
              "llama_cpp_kld": _llama_cpp_reference(Path("docs/gguf_export.json")),
              "rows": rows, "seconds": time.perf_counter() - t_start}
    result["q8_0_target"] = floor_check(result)
    print("\n" + "\n".join(table(result)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def table(result: dict) -> list[str]:
    lines = ["| row | " + " | ".join(f"{t} KLD | {t} top-1" for t in TEXTS) + " |",
             "|---|" + "---:|---:|" * len(TEXTS)]
    for r in result["rows"]:
        cells = " | ".join(f"{r['texts'][t]['kld']:.5f} | {100 * r['texts'][t]['top1']:.2f}%"
                           for t in TEXTS)
        lines.append(f"| {r['row']} | {cells} |")
    for name, kld in result["llama_cpp_kld"].items():
        cells = " | ".join(f"{kld[t]:.5f} | " for t in TEXTS)
        lines.append(f"| {name}: llama.cpp's own KLD (docs/gguf_export) | {cells}|")
    for text, check in result.get("q8_0_target", {}).items():
        verdict = "below" if check["floor_above_target"] else "above"
        lines.append(f"\n{text}: Q8_0 floor (FP32 weights) {check['floor']:.5f}, target (half "
                     f"of llama.cpp's Q8_0) {check['target']:.5f}: the target is {verdict} "
                     "the floor")
    lines.append(f"\n{result['seconds']:.0f} s in all; CPU: {result['cpu']}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
