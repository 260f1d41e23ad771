"""Generation (greedy, or any token picker) and one-shot prefill on
:class:`~lowbit.runtime.decoder.DecoderRuntime`."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.runtime.decoder import DecoderRuntime

__all__ = ["GenerateStats", "generate", "hf_greedy", "prefill_logits"]


@dataclass
class GenerateStats:
    """Timings of one :func:`generate` call (seconds; rates in tokens per second).

    ``prefill_seconds`` covers the prompt's forward and the first new token;
    ``decode_tokens_per_second`` counts the remaining tokens over ``decode_seconds``;
    ``end_to_end_tokens_per_second`` is new tokens over the whole call (the figure comparable
    with timing Hugging Face ``generate``). ``compile_seconds`` is the first compiled step
    when this call compiled (that step is left out of the decode rate). ``matches_hf`` is set
    only when asked for: whether the tokens equal the model's own greedy ``generate``.
    """

    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float
    end_to_end_tokens_per_second: float
    dtype: str
    compiled: bool
    compile_seconds: float | None = None
    matches_hf: bool | None = None

    def as_dict(self) -> dict:
        """Plain-dict view, for JSON reports."""
        return asdict(self)


def _runtime(model: nn.Module | DecoderRuntime, dtype: torch.dtype, compile: bool):
    if isinstance(model, DecoderRuntime):
        if model.dtype != dtype or model.compile != compile:
            raise ValueError(
                f"runtime was built with dtype={model.dtype}, compile={model.compile}; "
                f"asked for dtype={dtype}, compile={compile}"
            )
        return model
    return DecoderRuntime(model, dtype=dtype, compile=compile)


def hf_greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The model's own greedy ``generate`` for exactly ``max_new_tokens`` tokens.

    End-of-sequence stopping is switched off without suppressing the EOS logit (as
    ``min_new_tokens`` would, changing the greedy choice): the EOS id is set to
    ``vocab_size``, an id the model never emits. The tokens are then comparable with
    :func:`generate` without ``eos_token_id``.
    """
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = int(model.config.vocab_size)  # None would be refilled by HF
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    with torch.inference_mode():
        return model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )


def generate(
    model: nn.Module | DecoderRuntime,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    compile: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    compare_hf: bool = False,
    next_token: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, GenerateStats]:
    """Decode ``max_new_tokens`` tokens after ``input_ids`` (``[B, T]``), greedy by default.

    ``model`` is a Llama-style Hugging Face causal LM (its linears may be quantized
    replacements) or a :class:`DecoderRuntime` to reuse (keeps its prepared weights and
    compiled step). Returns ``(tokens, stats)``: ``tokens`` is ``[B, T + n]`` like Hugging
    Face ``generate``; generation stops early only when ``eos_token_id`` (one id or several)
    is given and every row has produced one. ``compare_hf=True`` also runs the model's own
    greedy ``generate`` (slow) and sets ``stats.matches_hf``.

    ``next_token`` maps ``[B, V]`` logits to ``[B]`` ids in place of ``argmax`` (a sampler);
    ``on_token`` is handed each new ``[B]`` column as soon as it exists (streaming), inside
    the timed loop, so a slow callback shows in the rates.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or max_new_tokens < 1:
        raise ValueError("input_ids must be [B, T] with T >= 1, and max_new_tokens >= 1")
    runtime = _runtime(model, dtype, compile)
    pick = next_token or (lambda logits: logits.argmax(-1))
    emit = on_token or (lambda column: None)
    eos = None if eos_token_id is None else torch.tensor(eos_token_id, dtype=torch.long).reshape(-1)
    batch, length = input_ids.shape
    out = torch.empty(batch, length + max_new_tokens, dtype=input_ids.dtype)
    out[:, :length] = input_ids
    done = torch.zeros(batch, dtype=torch.bool)
    compiles_before = runtime.compiles
    compile_seconds = None

    start = time.perf_counter()
    logits = runtime.prefill(input_ids, max_len=length + max_new_tokens)
    out[:, length] = pick(logits)
    prefill_end = time.perf_counter()
    emit(out[:, length])
    produced, skipped = 1, 0.0
    for step in range(1, max_new_tokens):
        if eos is not None:
            done |= torch.isin(out[:, length + step - 1], eos)
            if bool(done.all()):
                break
        t0 = time.perf_counter()
        logits = runtime.decode(out[:, length + step - 1 : length + step])
        out[:, length + step] = pick(logits)
        emit(out[:, length + step])
        produced += 1
        if step == 1 and runtime.compiles != compiles_before:
            skipped = time.perf_counter() - t0  # this step compiled: keep it out of the rate
            compile_seconds = runtime.compile_seconds
    end = time.perf_counter()

    tokens = out[:, : length + produced]
    decode_s = end - prefill_end - skipped
    decode_steps = produced - 1 - (1 if skipped else 0)
    stats = GenerateStats(
        prompt_tokens=length,
        new_tokens=produced,
        prefill_seconds=prefill_end - start,
        decode_seconds=decode_s,
        decode_tokens_per_second=decode_steps / decode_s if decode_steps else float("nan"),
        end_to_end_tokens_per_second=produced / (end - start - skipped),
        dtype=str(runtime.dtype).removeprefix("torch."),
        compiled=runtime.compile,
        compile_seconds=compile_seconds,
    )
    if compare_hf:
        if isinstance(model, DecoderRuntime):
            raise ValueError("compare_hf needs the model, not a DecoderRuntime")
        reference = hf_greedy(model, input_ids, produced)
        stats.matches_hf = torch.equal(reference, tokens)
    return tokens, stats


def prefill_logits(
    model: nn.Module | DecoderRuntime,
    input_ids: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    compile: bool = False,
) -> torch.Tensor:
    """Logits ``[B, T, V]`` (in ``dtype``) of one forward over ``input_ids`` (``[B, T]``).

    ``compile=True`` compiles the forward for this shape first (minutes); to reuse the
    compiled forward, pass a ``DecoderRuntime(model, compile_prefill=True)`` as ``model``.
    """
    if isinstance(model, DecoderRuntime):
        if model.dtype != dtype or model.compile_prefill != compile:
            raise ValueError(
                f"runtime was built with dtype={model.dtype}, compile_prefill="
                f"{model.compile_prefill}; asked for dtype={dtype}, compile={compile}"
            )
        runtime = model
    else:
        runtime = DecoderRuntime(model, dtype=dtype, compile_prefill=compile)
    return runtime.prefill(input_ids, all_logits=True)
