"""Perplexity over non-overlapping windows, streaming one window at a time.

Two protocols:

- ``"full"``: every predicted token of each window is scored (``window - 1`` per window,
  position 0 is context only). This is lowbit's default and the one in BENCHMARKS.md.
- ``"llama.cpp"``: like ``llama-perplexity -c window``: only the second half is scored, i.e.
  the logits at positions ``window//2 .. window-2`` predicting tokens ``window//2+1 ..
  window-1`` (``window - 1 - window//2`` tokens: 255 for a window of 512). Its PPL is lower
  than "full" because every scored token has at least ``window//2`` tokens of context.

Logits are never kept for the whole text: ``logits_hook`` receives each window's scored
logits as they are produced (e.g. for KL divergence against a baseline).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError

__all__ = ["PROTOCOLS", "LogitsHook", "PerplexityError", "PerplexityResult", "perplexity",
           "scored_range"]

PROTOCOLS = ("full", "llama.cpp")

LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``hook(window_index, logits, targets)``: ``logits`` is ``(n_scored, vocab)`` float32 for the
positions the protocol scores and ``targets`` the ``(n_scored,)`` token ids they predict. The
tensors are only valid during the call; copy what you keep."""


class PerplexityError(LowbitError, ValueError):
    """Perplexity cannot be computed as asked; the message names the fix."""


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of ``perplexity``: PPL = exp(nll_mean) over ``n_tokens`` scored tokens."""

    ppl: float
    nll_mean: float
    n_tokens: int
    seconds: float
    n_windows: int
    window: int
    protocol: str
    window_nll: tuple[float, ...] = field(default=(), repr=False)  # mean NLL per window

    def __str__(self) -> str:
        return (f"PPL {self.ppl:.3f} ({self.protocol}, {self.n_windows}x{self.window}, "
                f"{self.n_tokens} tokens, {self.seconds:.1f} s)")


def scored_range(window: int, protocol: str) -> tuple[int, int]:
    """Positions ``[start, stop)`` whose logits are scored in a window (targets are +1)."""
    if protocol == "full":
        return 0, window - 1
    if protocol == "llama.cpp":
        return window // 2, window - 1
    raise PerplexityError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``ids`` (batch, T) and return logits (batch, T, vocab)."""
    kwargs: dict[str, Any] = {}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        kwargs["use_cache"] = False  # no KV cache: one pass per window
    out = model(ids, **kwargs)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        logits = out[0] if out[0].dim() == 3 else None
    if not torch.is_tensor(logits) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        got = type(out).__name__ if logits is None else tuple(getattr(logits, "shape", ()))
        raise PerplexityError(
            f"{type(model).__name__} returned no next-token logits of shape "
            f"(batch, {ids.shape[1]}, vocab) (got {got}): perplexity needs a language model "
            "with an LM head, e.g. one loaded with AutoModelForCausalLM; an encoder such as "
            "BertModel has none."
        )
    return logits


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    window: int = 512,
    n_windows: int = 32,
    protocol: str = "full",
    batch_size: int = 1,
    bos_token_id: int | None = None,
    logits_hook: LogitsHook | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the first ``window * n_windows`` tokens of ``token_ids``.

    The tokens are cut into non-overlapping windows of ``window`` tokens, each evaluated from
    an empty context (``batch_size`` windows per forward). ``protocol`` chooses which tokens
    are scored (module docstring). If ``bos_token_id`` is given, the first token of every
    window is replaced by it, as ``llama-perplexity`` does for vocabularies that add a BOS
    (it is context only, so the number of scored tokens does not change). If the text holds
    fewer than ``n_windows`` windows, all whole windows are used (with a warning).

    NLL is computed in float32 from the logits and summed in float64. The caller sets the
    thread count; the model is run under ``torch.inference_mode``.
    """
    start, stop = scored_range(window, protocol)
    if window < 2 or n_windows < 1 or batch_size < 1:
        raise PerplexityError(f"need window >= 2, n_windows >= 1 and batch_size >= 1, got "
                              f"{window}, {n_windows}, {batch_size}")
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise PerplexityError(f"token_ids must be 1-D, got shape {tuple(ids.shape)}")
    available = ids.numel() // window
    if available < 1:
        raise PerplexityError(
            f"the text has {ids.numel()} tokens, fewer than one window of {window}; pass a "
            "longer text or a smaller window."
        )
    if available < n_windows:
        warnings.warn(f"only {available} windows of {window} tokens fit in {ids.numel()} "
                      f"tokens; using {available} instead of {n_windows}", stacklevel=2)
        n_windows = available
    windows = ids[: n_windows * window].view(n_windows, window).clone()
    if bos_token_id is not None:
        windows[:, 0] = bos_token_id
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    t0 = time.perf_counter()
    total = 0.0
    window_nll: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for first in range(0, n_windows, batch_size):
                batch = windows[first: first + batch_size].to(device)
                logits = _logits(model, batch)
                for j in range(batch.shape[0]):
                    scored = logits[j, start:stop].float()
                    targets = batch[j, start + 1: stop + 1]
                    if targets.max().item() >= scored.shape[-1]:
                        raise PerplexityError(
                            f"token id {targets.max().item()} is outside the model's vocabulary "
                            f"of {scored.shape[-1]}: the tokenizer does not match the model."
                        )
                    nll = F.cross_entropy(scored, targets, reduction="sum").item()
                    total += nll
                    window_nll.append(nll / (stop - start))
                    if logits_hook is not None:
                        logits_hook(first + j, scored, targets)
                del logits
    finally:
        model.train(was_training)
    n_tokens = n_windows * (stop - start)
    nll_mean = total / n_tokens
    return PerplexityResult(
        ppl=math.exp(nll_mean), nll_mean=nll_mean, n_tokens=n_tokens,
        seconds=time.perf_counter() - t0, n_windows=n_windows, window=window,
        protocol=protocol, window_nll=tuple(window_nll),
    )
