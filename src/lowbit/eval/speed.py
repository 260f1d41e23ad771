"""Prefill and decode speed: one forward of many tokens, and greedy decode with a KV cache.

Prefill: one forward of 1 x ``prefill_tokens`` tokens. Decode: ``decode_tokens`` greedy
tokens after a ``prompt_tokens`` prompt with the KV cache. Median of ``repeats`` runs after
a warm-up. The caller sets the thread count.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SpeedReport:
    prefill_s: float
    decode_tok_s: float
    engine: str

    def to_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_tok_s": self.decode_tok_s,
                "engine": self.engine}


def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_speed(model: nn.Module, token_ids: torch.Tensor, *, prefill_tokens: int = 512,
                  prompt_tokens: int = 32, decode_tokens: int = 64, repeats: int = 3,
                  engine: str = "auto") -> SpeedReport:
    """``engine``: ``auto`` (lowbit's runtime when it supports the model), ``lowbit`` or
    ``hf`` (transformers' ``generate``)."""
    """Prefill seconds and decode tokens per second of ``model`` on ``token_ids``."""
    ids = torch.as_tensor(token_ids).reshape(-1)
    prefill_ids = ids[:prefill_tokens].unsqueeze(0)
    prompt = ids[:prompt_tokens].unsqueeze(0)
    run_generate, engine_name = _engine(model, engine)
    with torch.inference_mode():
        prefill = _median(lambda: model(prefill_ids, use_cache=False), repeats)
        decode = _median(lambda: run_generate(prompt, decode_tokens), repeats)
    return SpeedReport(prefill, decode_tokens / decode, engine_name)


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's unquantized parts run in (its first float parameter's)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


_BF16_DECODE_KERNELS = ("int8_weight.int8pack_mm", "int4_weight.int4pack_mm")
_FAMILIES = {"int8_weight": "int8_weight", "int4_weight": "int4_weight",
             "int8_dynamic": "w8a8", "int8_static": "w8a8"}


def runtime_dtype(model: nn.Module) -> torch.dtype:
    """The activation dtype to decode in, as ``kernels.autotune`` measured the whole decode
    step here (``runtime.<family>``: float32 with the fused C step, or bf16), by a majority
    of the quantized linears' families. bf16 only where it changes no numbers the model
    would not already round: a bf16 model, or one whose quantized linears are all
    weight-only (their torch kernels read bf16 activations). A float32 model decodes in
    float32. Under ``assume_cpu`` / ``LOWBIT_CPU``: bf16 when every linear's decode kernel
    reads bf16 anyway, else the model's dtype."""
    import lowbit.runtime  # noqa: F401  (registers the step probe runtime.* depends on)
    from lowbit.kernels import autotune
    from lowbit.nn import QuantizedLinear

    dtype = activation_dtype(model)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if autotune.by_flags():
        kernels = [m.kernel for m in linears]
        if kernels and all(k.startswith(_BF16_DECODE_KERNELS) for k in kernels):
            return torch.bfloat16
        return dtype
    families = [_FAMILIES.get(m.backend.name, "float") for m in linears] or ["float"]
    weight_only = all(f in ("int8_weight", "int4_weight") for f in families)
    if dtype is not torch.bfloat16 and not (linears and weight_only):
        return dtype
    votes = [autotune.choice(f"runtime.{f}") for f in families]
    return torch.bfloat16 if votes.count("bf16") > len(votes) / 2 else torch.float32


def _engine(model: nn.Module, engine: str):
    """The generation loop to time: lowbit's lean runtime when it can run the model
    (Llama-style decoders), else Hugging Face ``generate``."""
    if engine in ("auto", "lowbit"):
        from lowbit.runtime import DecoderRuntime, UnsupportedModelError, generate

        dtype = runtime_dtype(model)
        try:
            # prepared once, outside the timing; the activations ``lowbit generate`` uses
            runtime = DecoderRuntime(model, dtype=dtype, activations="auto")
        except UnsupportedModelError:
            if engine == "lowbit":
                raise
        else:
            return (lambda p, n: generate(runtime, p, n, dtype=dtype)), runtime.engine_name

    def hf(prompt, n):
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)

    return hf, "transformers.generate"
