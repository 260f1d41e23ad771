"""What evaluation reads off a model besides its outputs: its tokenizer and which kernels run.

Shared by ``scoring.evaluate`` and ``embeddings.evaluate_embeddings`` (which ``evaluate``
dispatches to), so it lives below both and imports neither.
"""

from __future__ import annotations

import collections

from torch import nn

__all__ = ["kernels_of", "tokenizer_for"]


def tokenizer_for(model: nn.Module, tokenizer):
    """``tokenizer``, or the one of the checkpoint ``model`` was loaded from."""
    if tokenizer is not None:
        return tokenizer
    spec = getattr(model, "lowbit_spec", None)
    if not spec:
        raise ValueError("pass tokenizer=... (the model does not say where it came from)")
    from lowbit.model import load_tokenizer

    return load_tokenizer(spec)


def kernels_of(model: nn.Module) -> dict[str, int]:
    """How many linear layers run each kernel, e.g. ``{"F.linear (float32)": 7}``."""
    from lowbit.nn import QuantizedLinear

    counts: collections.Counter = collections.Counter()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            counts[m.kernel] += 1
        elif isinstance(m, nn.Linear):
            counts[f"F.linear ({str(m.weight.dtype).removeprefix('torch.')})"] += 1
    return dict(counts)
