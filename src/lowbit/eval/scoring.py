"""``evaluate(model, baseline=...)``: perplexity, divergence from the baseline, size, speed.

One call gives the numbers of ``lowbit eval --json``: ``ppl``, ``delta_ppl_pct``,
``kld_mean``, ``kld_p99``, ``top1_agreement``, ``bits_per_weight``, ``bytes``,
``prefill_s``, ``decode_tok_s`` and which kernels ran.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lowbit.eval.compare import BaselineLogprobs, KLAccumulator
from lowbit.eval.embeddings import evaluate_embeddings, is_encoder
from lowbit.eval.model_info import kernels_of, tokenizer_for
from lowbit.eval.perplexity_windows import perplexity
from lowbit.eval.size import model_size
from lowbit.eval.speed import measure_speed

_BASELINES: dict[tuple, tuple[float, BaselineLogprobs]] = {}


def baseline_logprobs(baseline: nn.Module, ids: torch.Tensor, *, window: int, n_windows: int,
                      protocol: str) -> tuple[float, BaselineLogprobs]:
    """Baseline PPL and log-probabilities, computed once per (model, data, protocol)."""
    key = (id(baseline), ids.numel(), int(ids[:64].sum()), window, n_windows, protocol)
    if key not in _BASELINES:
        collector = BaselineLogprobs()
        result = perplexity(baseline, ids, window=window, n_windows=n_windows,
                            protocol=protocol, logits_hook=collector)
        _BASELINES.clear()  # one baseline at a time: they are large
        _BASELINES[key] = (result.ppl, collector)
    return _BASELINES[key]


def evaluate(
    model: nn.Module,
    tokenizer=None,
    *,
    baseline: nn.Module | None = None,
    data: str = "pydoc",
    window: int = 512,
    n_windows: int = 32,
    protocol: str = "full",
    speed: bool = True,
) -> dict:
    """Every number lowbit reports for ``model`` (see the module docstring)."""
    from lowbit.data import tokens

    if is_encoder(model):  # no LM head: embedding similarity instead of perplexity
        return evaluate_embeddings(model, tokenizer, baseline=baseline, data=data, speed=speed)
    t0 = time.perf_counter()
    tok = tokenizer_for(model, tokenizer)
    ids = tokens(data, tok)[: window * n_windows]  # short text: perplexity says what fits
    result: dict = {"data": str(data), "protocol": protocol, "window": window,
                    "n_windows": n_windows}
    hook = None
    if baseline is not None:
        base_ppl, base_lp = baseline_logprobs(baseline, ids, window=window, n_windows=n_windows,
                                              protocol=protocol)
        hook = KLAccumulator(base_lp)
        result["baseline_ppl"] = base_ppl
    ppl = perplexity(model, ids, window=window, n_windows=n_windows, protocol=protocol,
                     logits_hook=hook)
    result.update(ppl=ppl.ppl, tokens_scored=ppl.n_tokens, eval_s=ppl.seconds)
    if baseline is not None:
        result["delta_ppl_pct"] = 100 * (ppl.ppl / result["baseline_ppl"] - 1)
        result.update(hook.report().to_dict())
    result.update(model_size(model).to_dict())
    result["kernels"] = kernels_of(model)
    if speed:
        result.update(measure_speed(model, ids).to_dict())
    result["seconds"] = time.perf_counter() - t0
    return result
