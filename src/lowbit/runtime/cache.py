"""A preallocated key/value cache: one ``[B, Hkv, max_len, D]`` buffer per layer and kind."""

from __future__ import annotations

import torch

__all__ = ["StaticKVCache"]


class StaticKVCache:
    """Keys and values for ``num_layers`` blocks, allocated once and written in place.

    ``k[i]`` and ``v[i]`` are ``[batch, kv_heads, max_len, head_dim]`` tensors in ``dtype``;
    the runtime tracks how many positions are filled. Nothing is ever reallocated while a
    sequence grows, so a decode step does no allocation for the cache.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.batch, self.max_len = batch, max_len
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache buffers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
