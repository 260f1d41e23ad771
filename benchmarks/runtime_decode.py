"""Decode and prefill speed of ``lowbit.runtime`` against Hugging Face eager, in one process.

Protocol: decode = 64 greedy tokens after a 32-token prompt with the KV
cache, timed end to end (prompt forward included, for every row alike); prefill = one forward
of 1x512 tokens returning all logits. Every configuration is warmed up once, then the
configurations are timed round-robin ``--repeats`` times (so load drifts hit all of them) and
the median is reported, with its ratio against HF FP32 eager from the same process.
The prompt is CPython's ``pydoc_data.topics`` text, tokenized.

    .venv/bin/python benchmarks/runtime_decode.py            # full table (~10 minutes)
    .venv/bin/python benchmarks/runtime_decode.py --no-compile --repeats 5

The int8 rows replace every decoder linear and the output head with a module built here on
torch's kernels (per-output-channel symmetric int8 codes): weight-only
``_weight_int8pack_mm`` with BF16 activations, and for prefill also a dynamic w8a8 module
(per-token int8 activations, ``torch._int_mm``). The token embedding stays as loaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

from lowbit.runtime import DecoderRuntime, generate, hf_greedy


def _int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 codes ``[N, K]`` and FP32 scales ``[N]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8WeightOnly(nn.Module):
    """``y = x @ (q * scale).T`` via ``_weight_int8pack_mm``; BF16 activations in and out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        qdata, scale = _int8_codes(linear.weight)
        self.register_buffer("qdata", qdata.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(),
                                               self.qdata, self.scale)
        return y.view(*shape[:-1], -1)


class Int8Dynamic(nn.Module):
    """W8A8: per-token dynamic int8 activations times int8 weights (``torch._int_mm``).

    Rows <= 16 (decode) fall back to the weight-only kernel: ``_int_mm`` needs more rows.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        qdata, scale = _int8_codes(linear.weight)
        self.register_buffer("qdata", qdata.contiguous())
        self.register_buffer("qdata_t", qdata.t().contiguous())  # [K, N]
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if x2.shape[0] <= 16:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qdata, self.scale_bf16)
        else:
            xs = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127
            xq = torch.round(x2 / xs).clamp(-127, 127).to(torch.int8)
            y = (torch._int_mm(xq, self.qdata_t) * xs * self.scale).to(x.dtype)
        return y.view(*shape[:-1], -1)


def quantized_copy(model: nn.Module, module_type: type[nn.Module]) -> nn.Module:
    """A BF16 copy of ``model`` with every decoder linear and the LM head replaced."""
    qmodel = copy.deepcopy(model).to(torch.bfloat16)
    qmodel.config.tie_word_embeddings = False  # the head gets its own (quantized) module
    for module in list(qmodel.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, module_type(child))
    return qmodel.eval()


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """The first ``length`` tokens of CPython's pydoc topics text, ``[1, length]``."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    ids = tokenizer(text[: 40 * length], return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise SystemExit(f"prompt text gave only {ids.shape[1]} tokens")
    return ids


def time_round_robin(configs: dict, repeats: int) -> dict[str, list[float]]:
    """Warm each config up once, then time all of them round-robin ``repeats`` times."""
    for fn in configs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def agreement(tokens: torch.Tensor, reference: torch.Tensor, start: int) -> str:
    """``matched/total`` new tokens before the first difference from ``reference``."""
    new, ref = tokens[0, start:], reference[0, start:]
    diff = (new != ref).nonzero()
    same = int(diff[0, 0]) if len(diff) else len(ref)
    return f"{same}/{len(ref)}"


def print_table(title: str, unit: str, rows: list[tuple[str, float, str]], base: float) -> None:
    """Markdown table: config, median value, ratio vs the baseline, note."""
    print(f"\n### {title}\n")
    print(f"| config | {unit} | x HF FP32 eager | check |")
    print("|---|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value:.3g} | {value / base if 'tok' in unit else base / value:.2f} "
              f"| {note} |")


def bench_decode(models: dict, ids: torch.Tensor, args) -> None:
    n, start = args.new_tokens, ids.shape[1]
    reference = hf_greedy(models["fp32"], ids, n)
    runtimes = {
        "runtime FP32": DecoderRuntime(models["fp32"], dtype=torch.float32),
        "runtime BF16": DecoderRuntime(models["fp32"], dtype=torch.bfloat16),
        "runtime BF16 + int8 weight-only": DecoderRuntime(models["int8wo"],
                                                          dtype=torch.bfloat16),
    }
    compile_s = {}
    if args.compile:
        for name, model in (("runtime BF16 + compile", models["fp32"]),
                            ("runtime BF16 + int8 weight-only + compile", models["int8wo"])):
            rt = DecoderRuntime(model, dtype=torch.bfloat16, compile=True)
            t0 = time.perf_counter()
            generate(rt, ids, n, compile=True)
            compile_s[name] = time.perf_counter() - t0
            runtimes[name] = rt
    configs = {
        "HF eager FP32": lambda: hf_greedy(models["fp32"], ids, n),
        "HF eager BF16": lambda: hf_greedy(models["bf16"], ids, n),
        "HF eager BF16 + int8 weight-only": lambda: hf_greedy(models["int8wo"], ids, n),
    }
    for name, rt in runtimes.items():
        configs[name] = lambda rt=rt: generate(rt, ids, n, dtype=rt.dtype, compile=rt.compile)[0]
    times = time_round_robin(configs, args.repeats)
    rows = []
    for name, fn in configs.items():
        note = "same tokens as HF FP32: " + agreement(fn(), reference, start)
        if name in compile_s:
            note += f"; first call (compiles) {compile_s[name]:.0f} s"
        rows.append((name, n / statistics.median(times[name]), note))
    title = f"Decode: {n} greedy tokens after a {start}-token prompt, median of {args.repeats}"
    print_table(title, "tok/s", rows, rows[0][1])
    print(f"(load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())})")


def bench_prefill(models: dict, ids: torch.Tensor, args) -> None:
    with torch.inference_mode():
        reference = models["fp32"](ids).logits.float()
    runtimes = {
        "runtime FP32": DecoderRuntime(models["fp32"], dtype=torch.float32),
        "runtime BF16": DecoderRuntime(models["fp32"], dtype=torch.bfloat16),
        "runtime BF16 + int8 weight-only": DecoderRuntime(models["int8wo"],
                                                          dtype=torch.bfloat16),
        "runtime BF16 + w8a8 dynamic": DecoderRuntime(models["w8a8"], dtype=torch.bfloat16),
    }

    compile_s = {}
    if args.compile:
        for name, model in (("runtime BF16 + compile", models["fp32"]),
                            ("runtime BF16 + w8a8 dynamic + compile", models["w8a8"])):
            rt = DecoderRuntime(model, dtype=torch.bfloat16, compile_prefill=True)
            t0 = time.perf_counter()
            rt.prefill(ids, all_logits=True)
            compile_s[name] = time.perf_counter() - t0
            runtimes[name] = rt

    def hf(model):
        with torch.inference_mode():
            return model(ids).logits

    configs = {
        "HF eager FP32": lambda: hf(models["fp32"]),
        "HF eager BF16": lambda: hf(models["bf16"]),
    }
    for name, rt in runtimes.items():
        configs[name] = lambda rt=rt: rt.prefill(ids, all_logits=True)
    times = time_round_robin(configs, args.repeats)
    rows = []
    for name, fn in configs.items():
        logits = fn().float()
        top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        err = (logits - reference).abs().max().item()
        note = f"top-1 = FP32's {100 * top1:.1f}%, max abs logit diff {err:.3g}"
        if name in compile_s:
            note += f"; first call (compiles) {compile_s[name]:.0f} s"
        rows.append((name, statistics.median(times[name]), note))
    title = f"Prefill: one forward of 1x{ids.shape[1]} (all logits), median of {args.repeats}"
    print_table(title, "seconds", rows, rows[0][1])
    print(f"(load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name, GGUF or HF dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-decode", dest="decode", action="store_false")
    parser.add_argument("--no-prefill", dest="prefill", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lowbit.model.loaders import load_model, load_tokenizer

    fp32 = load_model(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    models = {
        "fp32": fp32,
        "bf16": copy.deepcopy(fp32).to(torch.bfloat16).eval(),
        "int8wo": quantized_copy(fp32, Int8WeightOnly),
    }
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, "
          f"load average before: {load}")
    if args.decode:
        bench_decode(models, prompt_ids(tokenizer, args.prompt_tokens), args)
    if args.prefill:
        models["w8a8"] = quantized_copy(fp32, Int8Dynamic)
        bench_prefill(models, prompt_ids(tokenizer, args.prefill_tokens), args)


if __name__ == "__main__":
    main()
