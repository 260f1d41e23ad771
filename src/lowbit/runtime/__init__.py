"""A lean decoder runtime: greedy generation for Llama-style models, much faster than eager
Hugging Face ``generate`` on a CPU, running the model's own (possibly quantized) modules.

    from lowbit.runtime import generate, prefill_logits
    tokens, stats = generate(model, input_ids, 64)            # BF16 activations, static cache
    logits = prefill_logits(model, input_ids, torch.float32)  # [B, T, V]

See :mod:`lowbit.runtime.arch` for the architectures it accepts. Nothing compiles at import;
``compile=True`` compiles the decode step with ``torch.compile`` on first use.
"""

from lowbit.kernels import autotune
from lowbit.runtime.arch import DecoderLayout, UnsupportedModelError, resolve_decoder
from lowbit.runtime.cache import StaticKVCache
from lowbit.runtime.decoder import DecoderRuntime
from lowbit.runtime.generation import GenerateStats, generate, hf_greedy, prefill_logits
from lowbit.runtime.probe import step_candidates

autotune.register_step_probe(step_candidates)  # kernels measure the runtime's step through it

__all__ = [
    "DecoderLayout",
    "DecoderRuntime",
    "GenerateStats",
    "StaticKVCache",
    "UnsupportedModelError",
    "generate",
    "hf_greedy",
    "prefill_logits",
    "resolve_decoder",
]
