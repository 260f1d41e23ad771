"""Causal prefill attention in one C call per block (``csrc/prefill_attention.c``).

``attend`` does what the runtime's prefill otherwise does in torch: RoPE on the queries and
keys, the writes of keys and values into the cache, and ``scaled_dot_product_attention``
with ``is_causal=True`` and grouped-query heads; the output comes back in the
``[B, T, H * D]`` layout the output projection reads, so no transposes or copies are left.
Float32 only; the torch path (``DecoderRuntime``'s prefill) is its reference, and
``autotune`` measures which of the two runs (``prefill.attention``).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from lowbit.kernels import native

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _call():
    """``lowbit_prefill_attention`` of the library loaded now, its argument types set (after
    ``native.reset`` another library may be loaded, its functions bare)."""
    fn = native.library().lowbit_prefill_attention
    if fn.argtypes is None:
        fn.argtypes = [_P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _F, _P, _P, _P]
        fn.restype = ctypes.c_int
    return fn


def supported(head_dim: int, heads: int, kv_heads: int) -> bool:
    """Whether the C kernel takes this attention shape (``attend`` raises otherwise)."""
    return (native.available() and head_dim % 8 == 0 and 8 <= head_dim <= 256
            and heads % kv_heads == 0 and heads // kv_heads <= 16)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, scale: float,
           heads: int) -> torch.Tensor:
    """Causal attention of a prompt at positions ``0..T-1``; returns ``[B, T, H * D]``.

    ``q`` ``[B, T, H * D]``, ``k`` and ``v`` ``[B, T, Hkv * D]`` (un-rotated), ``cos`` and
    ``sin`` ``[>= T, D]`` (the runtime's tables, ``sin`` negated in its first half), the
    caches ``[B, Hkv, L, D]`` (positions ``0..T-1`` are written): all float32, the tables
    and caches contiguous.
    """
    batch, length, _ = q.shape
    _, kv_heads, max_len, dim = kcache.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    for name, t in (("q", q), ("k", k), ("v", v), ("kcache", kcache), ("vcache", vcache),
                    ("cos", cos), ("sin", sin)):
        if t.dtype is not torch.float32 or not t.is_contiguous():
            raise ValueError(f"prefill attention: {name} must be contiguous float32")
    if not supported(dim, heads, kv_heads) or length > max_len or cos.shape[0] < length:
        raise ValueError(f"prefill attention: unsupported shape (head_dim {dim}, heads "
                         f"{heads}, kv heads {kv_heads}, {length} tokens, cache {max_len})")
    padded = -(-length // 32) * 32
    out = torch.empty(batch, length, heads * dim)
    q_rot = torch.empty(batch, heads, length, dim)
    k_t = torch.empty(batch, kv_heads, dim, padded)
    rc = _call()(q.data_ptr(), k.data_ptr(), v.data_ptr(), batch, length, heads, kv_heads,
                 dim, max_len, cos.data_ptr(), sin.data_ptr(), kcache.data_ptr(),
                 vcache.data_ptr(), float(scale), out.data_ptr(), q_rot.data_ptr(),
                 k_t.data_ptr())
    if rc == -2:
        raise MemoryError("prefill attention: no memory for the score scratch")
    if rc != 0:
        raise ValueError("prefill attention: the C kernel refused the shape")
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The runtime's "rotate half" RoPE along the last axis (``sin`` negated in its first
    half): ``x cos + roll(x, D / 2) sin``."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, -1), sin)


def attend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, scale: float,
                 heads: int) -> torch.Tensor:
    """``attend`` in torch operations, any float dtype: the reference, and the path that runs
    where the C kernel does not (bf16, compiled prefill, unsupported shapes)."""
    batch, length, _ = q.shape
    kv_heads, dim = kcache.shape[1], kcache.shape[3]
    cos, sin = cos[:length], sin[:length]
    q = rope(q.view(batch, length, heads, dim).transpose(1, 2), cos, sin)
    k = rope(k.view(batch, length, kv_heads, dim).transpose(1, 2), cos, sin)
    v = v.view(batch, length, kv_heads, dim).transpose(1, 2)
    kcache[:, :, :length].copy_(k)
    vcache[:, :, :length].copy_(v)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                       scale=scale, enable_gqa=heads != kv_heads)
    return a.transpose(1, 2).reshape(batch, length, heads * dim)
