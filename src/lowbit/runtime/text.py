"""Text in, text out: ``lowbit.generate(model, tokenizer, prompt)``.

Wraps the token-level :func:`lowbit.runtime.generation.generate` with what a person talking
to a model needs: the prompt encoded (through the chat template with ``chat=True``), greedy
or seeded temperature / top-p sampling, text streamed as it decodes, and stopping at the
model's end-of-sequence ids. A model the runtime cannot drive still generates, through its
own Hugging Face ``generate``; :attr:`TextStats.engine` says which loop ran and why.

Activations run in the model's own dtype unless told otherwise, so greedy text is the text
the model's own forward would give, not a faster approximation of it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime.arch import UnsupportedModelError
from lowbit.runtime.decoder import DecoderRuntime
from lowbit.runtime.generation import generate as generate_ids

__all__ = ["GenerateError", "TextStats", "check_options", "encode_prompt", "generate"]

Stream = Callable[[str], Any] | TextIO


class GenerateError(LowbitError, ValueError):
    """Input that cannot be generated from: what was wrong and what to pass instead."""


@dataclass
class TextStats:
    """What one :func:`generate` call ran and how fast (rates in tokens per second).

    ``prefill_tokens_per_second`` is prompt tokens over the time to the first new token;
    ``decode_tokens_per_second`` the remaining new tokens over their time (NaN with one new
    token). ``kernels`` counts linear layers per kernel (``QuantizedLinear.kernel``, or
    ``F.linear (dtype)``); ``fallback`` is why the runtime did not run, when it did not.
    """

    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    engine: str
    kernels: dict[str, int] = field(default_factory=dict)
    fallback: str | None = None

    def as_dict(self) -> dict:
        """Plain-dict view, for JSON reports."""
        return asdict(self)


def check_options(prompt: str, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0) -> None:
    """Refuse what no model could run, before one is loaded (the CLI calls it first)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerateError("the prompt is empty: give some text to continue or answer")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens (--max-new-tokens) must be at least 1, "
                            f"got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerateError(f"temperature must be >= 0 and top_p in (0, 1], got "
                            f"temperature={temperature}, top_p={top_p}")


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> torch.Tensor:
    """``[1, T]`` ids of ``prompt``: as one user turn of the chat template with ``chat``
    (the template writes its own special tokens), else as plain text."""
    if tokenizer is None:
        raise GenerateError("generate needs the model's tokenizer (lowbit.load_tokenizer)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerateError("the prompt is empty: give some text to continue or answer")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GenerateError(
                "chat=True (--chat) needs a chat template, and this model's tokenizer has "
                "none (a base model, not an instruct one): drop --chat to continue the "
                "prompt as plain text")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        raise GenerateError("the prompt encodes to no tokens")
    return ids.reshape(1, -1).long()


def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 128, *,
             chat: bool = False, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stream: Stream | None = None, dtype: torch.dtype | None = None,
             activations: str = "auto") -> tuple[str, TextStats]:
    """Continue ``prompt`` (or answer it, with ``chat``) and return ``(text, stats)``.

    Greedy when ``temperature`` is 0; otherwise samples from the softmax at ``temperature``
    restricted to the smallest set of tokens holding ``top_p`` of the mass, from a generator
    seeded with ``seed`` (same seed, same text). Stops after ``max_new_tokens`` or at an
    end-of-sequence id. ``stream`` (a callable or a text file such as ``sys.stdout``) gets
    the text piece by piece as it decodes; the pieces join to the returned text. ``dtype``
    is the runtime's activation dtype (default: the model's). ``activations``: the native
    decode loop's (float32 runtimes): ``"auto"`` (int8 per block of 32, as llama.cpp rounds
    them, where that measured faster in this process; else float32), ``"int8"`` or
    ``"float"`` (the reference); ``stats.engine`` says which ran.
    """
    check_options(prompt, max_new_tokens, temperature, top_p)
    if activations not in ("auto", "int8", "float"):
        raise GenerateError(f"activations must be 'auto', 'int8' or 'float', got "
                            f"{activations!r}")
    input_ids = encode_prompt(tokenizer, prompt, chat)
    _check_length(model, input_ids.shape[1], max_new_tokens)
    text = _TextStream(tokenizer, stream)
    runtime, why_not = _try_runtime(model, dtype or _model_dtype(model),
                                    input_ids.shape[1] + max_new_tokens, activations)
    eos = _eos_ids(model, tokenizer)
    if runtime is not None:
        stats = _runtime_generate(runtime, model, input_ids, max_new_tokens,
                                  _picker(temperature, top_p, torch.Generator().manual_seed(seed)),
                                  eos, text)
    else:
        stats = _hf_generate(model, input_ids, max_new_tokens, temperature, top_p, seed, eos,
                             text)
        stats.fallback = why_not
    return text.end(), stats


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _check_length(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse before any work a sequence longer than the model's positions."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and prompt_tokens + max_new_tokens > limit:
        room = int(limit) - prompt_tokens
        fix = (f"lower max_new_tokens (--max-new-tokens) to {room} or less" if room > 0 else
               "shorten the prompt")
        raise GenerateError(
            f"the prompt's {prompt_tokens} tokens + {max_new_tokens} new tokens exceed the "
            f"model's limit of {limit} positions (max_position_embeddings): {fix}")


def _try_runtime(model: nn.Module, dtype: torch.dtype, length: int,
                 activations: str = "auto") -> tuple[DecoderRuntime | None, str | None]:
    """The lean runtime for ``model``, or ``None`` and the reason it cannot run it."""
    try:
        runtime = DecoderRuntime(model, dtype=dtype, activations=activations)
    except UnsupportedModelError as exc:
        return None, str(exc)
    window = runtime.spec.sliding_window
    if window is not None and length > window:
        return None, f"{length} positions exceed the sliding window {window}"
    return runtime, None


def _runtime_generate(runtime: DecoderRuntime, model: nn.Module, input_ids: torch.Tensor,
                      max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor],
                      eos: list[int] | None, text: _TextStream) -> TextStats:
    _, raw = generate_ids(runtime, input_ids, max_new_tokens, dtype=runtime.dtype,
                          eos_token_id=eos, next_token=pick,
                          on_token=lambda column: text.put(int(column[0])))
    engine = runtime.engine_name
    return TextStats(raw.prompt_tokens, raw.new_tokens, raw.prompt_tokens / raw.prefill_seconds,
                     raw.decode_tokens_per_second, engine, _kernels(model, runtime.dtype))


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int] | None:
    """End-of-sequence ids as Hugging Face ``generate`` reads them (generation config
    first, then the tokenizer), so both loops stop at the same token."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
    return ids or None


def _picker(temperature: float, top_p: float,
            generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B, V]`` logits -> ``[B]`` ids: argmax, or a temperature / top-p (nucleus) draw."""
    if temperature == 0:
        return lambda logits: logits.argmax(-1)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * (probs.cumsum(-1) - probs < top_p)  # keeps at least the top token
        choice = torch.multinomial(probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)

    return draw


def _kernels(model: nn.Module, float_dtype: torch.dtype | None) -> dict[str, int]:
    """Linear layers per kernel; plain ``nn.Linear`` named with the dtype it runs in."""
    from lowbit.nn import QuantizedLinear

    counts: collections.Counter = collections.Counter()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            counts[m.kernel] += 1
        elif isinstance(m, nn.Linear):
            dtype = float_dtype or m.weight.dtype
            counts[f"F.linear ({str(dtype).removeprefix('torch.')})"] += 1
    return dict(counts)


def _hf_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int, eos: list[int] | None,
                 text: _TextStream) -> TextStats:
    """The model's own ``generate``, timed through its streamer hook."""
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        config = getattr(model, "config", None)
        kind = getattr(config, "model_type", None) or type(model).__name__
        raise GenerateError(
            f"{type(model).__name__} ({kind}) is not a causal language model: an encoder or "
            "classifier has no next token to generate; use lowbit eval on it instead")
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              eos_token_id=eos, pad_token_id=(eos or [0])[0])
    if temperature > 0:
        config.update(temperature=temperature, top_p=top_p, top_k=0)
    timer = _StreamTimer(text)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)  # HF samples from the global generator; fork_rng restores it
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                       generation_config=config, streamer=timer)
    end = time.perf_counter()
    first = timer.first_token_at or end
    decode_s = end - first
    new = timer.new_tokens
    return TextStats(input_ids.shape[1], new, input_ids.shape[1] / (first - timer.start),
                     (new - 1) / decode_s if new > 1 and decode_s > 0 else float("nan"),
                     "transformers generate", _kernels(model, None))


class _StreamTimer:
    """Hugging Face streamer: the first ``put`` is the prompt, each later one a new token."""

    def __init__(self, text: _TextStream):
        self.text = text
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.new_tokens = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for token in value.reshape(-1).tolist():
            self.new_tokens += 1
            self.text.put(int(token))

    def end(self) -> None:
        pass


class _TextStream:
    """Decodes new ids to text and hands out only what is settled: nothing that ends in a
    half-decoded UTF-8 character, nothing that rewrites what was already handed out."""

    def __init__(self, tokenizer: Any, stream: Stream | None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        if stream is None:
            self.sink = None
        elif hasattr(stream, "write"):
            self.sink = lambda piece: (stream.write(piece), stream.flush())
        else:
            self.sink = stream

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _send(self, text: str) -> None:
        if self.sink is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.sink(text[len(self.sent):])
            self.sent = text

    def put(self, token: int) -> None:
        self.ids.append(token)
        if self.sink is not None:
            text = self._decode()
            if not text.endswith("\ufffd"):
                self._send(text)

    def end(self) -> str:
        """The whole new text (the rest of it streamed)."""
        text = self._decode()
        self._send(text)
        return text
