"""Encoder evaluation: how far a quantized sentence encoder's embeddings move from the baseline's.

Sentences are paragraphs of the corpus (``"pydoc"`` by default): every blank-line separated
paragraph of 40 to 400 characters that reads as prose (not code), whitespace collapsed,
``n_sentences`` of them taken evenly across the text. Each is embedded as
sentence-transformers does for all-MiniLM-L6-v2: the mean of the last hidden states over the
real tokens ([CLS] and [SEP] included, padding excluded).

Metrics against the baseline: cosine similarity of each sentence's embedding with the
baseline's (mean, minimum, 1st percentile) and nearest-neighbour agreement, the share of
sentences whose closest other sentence (by cosine) is the same for both models.
"""

from __future__ import annotations

import re
import time

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.model_info import kernels_of, tokenizer_for
from lowbit.eval.size import model_size

__all__ = ["EmbeddingError", "embed", "evaluate_embeddings", "is_encoder", "nn_agreement",
           "sentences"]

_BASELINES: dict[tuple, torch.Tensor] = {}


class EmbeddingError(LowbitError, ValueError):
    """Embeddings cannot be evaluated as asked; the message names the fix."""


def is_encoder(model: nn.Module) -> bool:
    """True for a Hugging Face model without a language-model head (``BertModel``): its
    outputs are hidden states to embed, not next-token logits."""
    config = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if config is None or get_head is None or getattr(config, "is_encoder_decoder", False):
        return False
    return get_head() is None


def sentences(source: str = "pydoc", count: int = 256, *, min_chars: int = 40,
              max_chars: int = 400) -> list[str]:
    """``count`` prose paragraphs of ``source``, evenly spaced (see the module docstring)."""
    from lowbit.data import corpus_text

    prose = []
    for para in re.split(r"\n\s*\n", corpus_text(source)):
        text = " ".join(para.split())
        letters = sum(c.isalpha() or c == " " for c in text)
        if min_chars <= len(text) <= max_chars and letters >= 0.85 * len(text) \
                and not text.startswith((">>>", "...")):
            prose.append(text)
    if len(prose) < 2:
        raise EmbeddingError(f"{source!r} holds {len(prose)} prose paragraphs of {min_chars}-"
                             f"{max_chars} characters; nearest neighbours need at least 2: pass "
                             "a longer text with blank lines between paragraphs")
    if count < len(prose):
        step = len(prose) / count
        prose = [prose[int(i * step)] for i in range(count)]
    return prose


def embed(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 32,
          max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states, ``(len(texts), hidden)`` float32."""
    encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(texts), 0)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for first in range(0, len(order), batch_size):
                idx = order[first: first + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros(len(idx), width, dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[row, : len(encoded[i])] = 1
                hidden = _hidden_states(model(input_ids=ids, attention_mask=mask))
                m = mask.unsqueeze(-1).float()
                pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1)
                if out.shape[1] == 0:
                    out = torch.empty(len(texts), pooled.shape[-1])
                out[idx] = pooled
    finally:
        model.train(was_training)
    return out


def _hidden_states(out) -> torch.Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)) and out:
        hidden = out[0]
    if not torch.is_tensor(hidden) or hidden.dim() != 3:
        raise EmbeddingError("the model returned no last_hidden_state (batch, tokens, hidden): "
                             "embedding evaluation needs an encoder such as BertModel")
    return hidden


def nn_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows whose nearest other row (by cosine) is the same in ``a`` and ``b``."""
    def nearest(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.double(), dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    return float((nearest(a) == nearest(b)).double().mean())


def _baseline_embeddings(baseline: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    key = (id(baseline), id(tokenizer), len(texts), hash(tuple(texts)))
    if key not in _BASELINES:
        _BASELINES.clear()
        _BASELINES[key] = embed(baseline, tokenizer, texts)
    return _BASELINES[key]


def evaluate_embeddings(model: nn.Module, tokenizer=None, *, baseline: nn.Module | None = None,
                        data: str = "pydoc", n_sentences: int = 256, speed: bool = True,
                        **_ignored) -> dict:
    """The ``evaluate`` numbers for an encoder: embedding similarity to ``baseline``, size,
    kernels, and encoding throughput. Keys: ``cosine_mean``, ``cosine_min``, ``cosine_p01``,
    ``nn_agreement``, ``bits_per_weight``, ``bytes``, ``sentences_per_s`` and more."""
    t0 = time.perf_counter()
    tok = tokenizer_for(model, tokenizer)
    texts = sentences(data, n_sentences)
    result: dict = {"task": "embeddings", "data": str(data), "n_sentences": len(texts),
                    "pooling": "mean"}
    t1 = time.perf_counter()
    emb = embed(model, tok, texts)
    encode_s = time.perf_counter() - t1
    if baseline is not None:
        ref = _baseline_embeddings(baseline, tok, texts)
        if ref.shape != emb.shape:
            raise EmbeddingError(f"baseline and model embed into {ref.shape[-1]} and "
                                 f"{emb.shape[-1]} dimensions: compare the same architecture")
        cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=-1)
        result.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                      cosine_p01=float(torch.quantile(cos, 0.01)),
                      nn_agreement=nn_agreement(emb, ref))
    result.update(model_size(model).to_dict())
    result["kernels"] = kernels_of(model)
    if speed:
        result.update(encode_s=encode_s, sentences_per_s=len(texts) / encode_s)
    result["seconds"] = time.perf_counter() - t0
    return result


def format_embedding_result(r: dict) -> list[str]:
    """Lines for ``lowbit eval`` to print for an encoder."""
    lines = [f"embeddings       {r['n_sentences']} sentences of {r['data']}, mean pooling"]
    if "cosine_mean" in r:
        lines.append(f"cosine vs base   mean {r['cosine_mean']:.5f}  min {r['cosine_min']:.5f}"
                     f"  p1 {r['cosine_p01']:.5f}")
        lines.append(f"nearest neighbour agreement  {100 * r['nn_agreement']:.1f}%")
    lines.append(f"size             {r['bytes'] / 1e6:.1f} MB in memory; linear weights "
                 f"{r['linear_bytes'] / 1e6:.1f} MB = {r['bits_per_weight']:.2f} bits/weight")
    if "sentences_per_s" in r:
        lines.append(f"speed            {r['sentences_per_s']:.1f} sentences/s")
    return lines
