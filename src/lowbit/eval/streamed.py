"""Perplexity of a model bigger than memory, one block at a time.

The windows ``perplexity`` would score are embedded once; then each decoder block is read
from the checkpoint (``model.lazy_model``), every window's hidden states pass through it and
it is put back on the ``meta`` device; last the final norm and the head score each window,
as ``perplexity`` does. Memory holds one block plus the hidden states of all windows
(``n_windows x window x hidden`` float32: 58 MB for 32 x 512 tokens at hidden 896), so the
numbers equal the in-memory evaluation's (same windows, same operations per window) whatever
the model's size. With a baseline, its final hidden states are kept beside the model's and
both heads score each window: KL divergence and top-1 as ``evaluate`` reports them.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.eval.compare import BaselineLogprobs, KLAccumulator
from lowbit.eval.perplexity_windows import PerplexityError, scored_range
from lowbit.eval.size import model_size


def open_lazy(spec: str | os.PathLike):
    """A ``LazyModel`` of a lowbit checkpoint or a Hugging Face folder (or bundled name)."""
    from lowbit.model.lazy_model import LazyModel
    from lowbit.model.loaders import resolve_spec

    kind, path = resolve_spec(spec)
    if kind == "lowbit":
        return LazyModel.open_checkpoint(path)
    if kind == "hf":
        return LazyModel.open(path)
    raise PerplexityError(f"{spec} is a {kind} file; block-by-block evaluation reads a lowbit "
                          "checkpoint or a Hugging Face folder (convert it, or drop --stream)")


@torch.inference_mode()
def _final_hidden(lazy, windows: torch.Tensor, progress: bool, size: dict) -> tuple:
    """Every window's hidden states after the last block, and (arch, sizes) on the way."""
    from lowbit.model.arch import first_output, resolve_arch
    from lowbit.model.runner import _capture
    from lowbit.model.stream_units import outside_paths

    arch = resolve_arch(lazy.model)
    rest = outside_paths(lazy, arch)
    lazy.materialize(rest, whole=False)
    try:
        _add_size(size, [lazy.model.get_submodule(p) for p in rest])
        hidden, kwargs = _capture(lazy.model, arch.blocks[0].module,
                                  [w.unsqueeze(0) for w in windows])
    finally:
        lazy.evict(rest, whole=False)
    blocks = arch.blocks
    if progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc="block-by-block eval", unit="block", leave=False,
                      disable=None)
    for block in blocks:
        lazy.materialize([block.name])
        _add_size(size, [block.module])
        for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
            hidden[i] = first_output(block.module(h, **kw))
        lazy.evict([block.name])
    return hidden, arch


def _add_size(size: dict, modules) -> None:
    for m in modules:
        r = model_size(m)
        for k, v in (("bytes", r.model_bytes), ("linear_bytes", r.linear_bytes),
                     ("linear_weights", r.linear_weights)):
            size[k] = size.get(k, 0) + v


def _head(lazy, arch):
    """``h -> logits`` with the final norm and head read (call ``lazy.evict`` after)."""
    from lowbit.eval.model_info import kernels_of

    paths = [p for p in (arch.final_norm, arch.head) if p]
    if arch.head is None:
        raise PerplexityError("the model has no LM head, so it has no perplexity")
    lazy.materialize(paths, whole=False)
    norm = lazy.model.get_submodule(arch.final_norm) if arch.final_norm else (lambda h: h)
    head = lazy.model.get_submodule(arch.head)
    return (lambda h: head(norm(h))), paths, kernels_of(head)


def streamed_evaluate(spec, tokenizer=None, *, baseline=None, data: str = "pydoc",
                      window: int = 512, n_windows: int = 32, protocol: str = "full",
                      progress: bool = True) -> dict:
    """``evaluate``'s quality and size numbers for checkpoint (or HF folder) ``spec``, read
    block by block (module docstring); ``baseline`` likewise (a path or name). ``data``: a
    text as ``evaluate`` takes it, or a 1-D tensor of token ids."""
    from lowbit.data import tokens
    from lowbit.model import load_tokenizer

    t0 = time.perf_counter()
    start, stop = scored_range(window, protocol)
    if isinstance(data, torch.Tensor):
        ids, data = data.reshape(-1)[: window * n_windows].long(), "<token ids>"
    else:
        tok = tokenizer if tokenizer is not None else load_tokenizer(spec)
        ids = torch.as_tensor(tokens(data, tok)[: window * n_windows], dtype=torch.long)
    n_windows = min(n_windows, ids.numel() // window)
    if n_windows < 1:
        raise PerplexityError(f"the text has {ids.numel()} tokens, fewer than one window of "
                              f"{window}; pass a longer text or a smaller window.")
    windows = ids[: n_windows * window].view(n_windows, window)
    result: dict = {"data": str(data), "protocol": protocol, "window": window,
                    "n_windows": n_windows, "streamed": True}
    models = [(spec, "")] + ([(baseline, "baseline_")] if baseline is not None else [])
    finals, sizes = [], []
    for s, _ in models:
        lazy, size = open_lazy(s), {}
        hidden, arch = _final_hidden(lazy, windows, progress, size)
        finals.append((lazy, arch, hidden))
        sizes.append(size)
    heads = [_head(lazy, arch) for lazy, arch, _ in finals]
    totals = [0.0] * len(finals)
    kl = None
    with torch.inference_mode():
        for i in range(n_windows):
            targets = windows[i, start + 1: stop + 1]
            logits = []
            for m, ((_, _, hidden), (fn, _, _)) in enumerate(zip(finals, heads, strict=True)):
                scored = fn(hidden[i])[0, start:stop].float()
                totals[m] += F.cross_entropy(scored, targets, reduction="sum").item()
                logits.append(scored)
                hidden[i] = None
            if len(logits) == 2:
                base = BaselineLogprobs()
                base(i, logits[1], targets)
                kl = kl or KLAccumulator(base)
                kl.baseline = base
                kl(i, logits[0], targets)
    n_tokens = n_windows * (stop - start)
    for (_, prefix), total in zip(models, totals, strict=True):
        result[f"{prefix}ppl"] = math.exp(total / n_tokens)
    result["tokens_scored"] = n_tokens
    if kl is not None:
        result["delta_ppl_pct"] = 100 * (result["ppl"] / result["baseline_ppl"] - 1)
        result.update(kl.report().to_dict())
    _add_size(sizes[0], [finals[0][0].model.get_submodule(p) for p in heads[0][1]])
    for (lazy, _, _), (_, paths, _) in zip(finals, heads, strict=True):
        lazy.evict(paths, whole=False)
    weights = sizes[0].get("linear_weights", 0)
    result.update(bytes=sizes[0].get("bytes", 0), linear_bytes=sizes[0].get("linear_bytes", 0),
                  linear_weights=weights, bits_per_weight=8 * sizes[0].get("linear_bytes", 0)
                  / weights if weights else 0.0)
    result["kernels"] = _kernels(finals[0][0])
    result["eval_s"] = result["seconds"] = time.perf_counter() - t0
    result["model"] = str(Path(spec)) if os.path.exists(spec) else str(spec)
    return result


def _kernels(lazy) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in lazy.quantized.values():
        kernel = entry.get("kernel", "?")
        counts[kernel] = counts.get(kernel, 0) + 1
    return counts
