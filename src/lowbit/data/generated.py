"""Calibration windows sampled from the model itself (the ``"generated"`` source).

Data-free calibration after LLM-QAT (Liu et al. 2023, "LLM-QAT: Data-Free Quantization Aware
Training for Large Language Models", arXiv:2305.17888): sequences sampled from the full-
precision model follow the model's own distribution, broad and in-distribution for its
activations, instead of one domain of text. Each window starts with the tokenizer's
document separator (``<|endoftext|>`` for SmolLM2, else its BOS/EOS token) and continues with
tokens sampled at temperature 1 from ``softmax(logits)`` (``torch.multinomial`` with a seeded
``torch.Generator``); an end-of-text token mid-window starts another "document", as in packed
pre-training data.

The windows depend on the model and on float rounding (thread count, kernels), so they are
computed once per (model weights and config, seed, shape) and kept under lowbit's cache folder
(``$LOWBIT_CACHE/generated/<key>.npy``, plain ``int32``, read without pickle); the key hashes
every parameter and buffer, so a different or already quantized model never reuses them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.data.sources import CorpusError

__all__ = ["cache_path", "generate", "generated_windows", "model_key", "start_token"]

#: version of the sampling procedure; part of the cache key
_VERSION = 1
#: windows sampled together (one KV cache); also the unit of the on-disk cache
BATCH = 16


def start_token(tokenizer: Any) -> int:
    """The token each window starts with: ``<|endoftext|>`` if the vocabulary has it (the
    document separator of GPT-2-style pre-training), else BOS, else EOS."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    raise CorpusError("the tokenizer has no <|endoftext|>, BOS or EOS token to start "
                      "generated calibration windows from; pass a calibration text instead")


@torch.inference_mode()
def generate(model: nn.Module, start: int, n: int, seq_len: int, *, seed: int = 0,
             batch_size: int = BATCH, temperature: float = 1.0, first_batch: int = 0
             ) -> torch.Tensor:
    """``(n, seq_len)`` token windows: ``start`` then ``seq_len - 1`` sampled tokens each.

    Uses the model's own forward with its KV cache (``use_cache=True``, any Hugging Face
    causal LM). Deterministic for a seed on a given machine: batch ``b`` (counted from
    ``first_batch``) samples with a generator seeded ``seed * 1_000_003 + b``.
    """
    if n < 1 or seq_len < 2 or batch_size < 1 or temperature <= 0:
        raise CorpusError(f"need n >= 1, seq_len >= 2, batch_size >= 1, temperature > 0; got "
                          f"n={n}, seq_len={seq_len}, batch_size={batch_size}, "
                          f"temperature={temperature}")
    # transformers >= 5.x calls the KV cache ``cache``, older releases ``past_key_values``
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    was_training = model.training
    model.eval()
    out = []
    try:
        for b, lo in enumerate(range(0, n, batch_size), first_batch):
            rows = min(batch_size, n - lo)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
            ids = torch.full((rows, 1), start, dtype=torch.long)
            seq, past = [ids], None
            for _ in range(seq_len - 1):
                res = model(input_ids=ids, use_cache=True, **{cache_arg: past})
                past = res["cache" if "cache" in res else "past_key_values"]
                probs = torch.softmax(res.logits[:, -1].float() / temperature, dim=-1)
                ids = torch.multinomial(probs, 1, generator=gen)
                seq.append(ids)
            out.append(torch.cat(seq, 1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def model_key(model: nn.Module) -> str:
    """A hex digest of the model's config and every parameter and buffer (name, dtype,
    shape, bytes): equal digests mean the same weights."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    h.update(type(model).__qualname__.encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def cache_path(key: str, start: int, seq_len: int, seed: int, batch: int, rows: int) -> Path:
    """Where ``generated_windows`` keeps batch ``batch`` (``rows`` windows) of a model
    digest ``key``."""
    from lowbit.model.hub import cache_dir

    spec = json.dumps([_VERSION, key, start, seq_len, seed, batch, rows]).encode()
    return cache_dir() / "generated" / f"{hashlib.sha256(spec).hexdigest()[:32]}.npy"


def generated_windows(model: nn.Module, tokenizer: Any, n: int, seq_len: int, *,
                      seed: int = 0, batch_size: int = BATCH, cache: bool = True
                      ) -> torch.Tensor:
    """The first ``n`` of the ``(n, seq_len)`` windows sampled from ``model`` (``generate``),
    made in whole batches of ``batch_size``, so any ``n`` reads a prefix of the same windows.
    Each batch is kept on disk and read back when the same model, seed and shape come again;
    a file is written under a temporary name and renamed, so a crash leaves no partial one."""
    if n < 1:
        raise CorpusError(f"need at least one generated window, got n={n}")
    start = start_token(tokenizer)
    key = model_key(model) if cache else ""
    out = []
    for b in range(-(-n // batch_size)):
        path = cache_path(key, start, seq_len, seed, b, batch_size) if cache else None
        if path is not None and path.is_file():
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (batch_size, seq_len):
                out.append(torch.from_numpy(arr.astype(np.int64)))
                continue
        windows = generate(model, start, batch_size, seq_len, seed=seed, first_batch=b)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, windows.numpy().astype(np.int32), allow_pickle=False)
            os.replace(tmp, path)
        out.append(windows)
    return torch.cat(out)[:n]
