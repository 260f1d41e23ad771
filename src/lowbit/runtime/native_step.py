"""A float32 decode step whose small operations run fused in C (``csrc/decode_ops.c``).

:class:`DecoderRuntime`'s eager decode issues about 25 torch operations per block besides its
7 linears (RMSNorm, RoPE, cache writes, attention, SiLU, residual adds), each a few
microseconds of dispatch for a few hundred floats: on SmolLM2-135M that is most of a
decode step once the linears run lowbit's native GEMVs. :class:`NativeDecodeStep` keeps the
linears as the runtime prepared them (prebound GEMVs, ``F.linear``, any module; q/k/v and
gate/up as one GEMV each where their kernels allow) and replaces everything between them with
four C calls per block:

    h = rmsnorm(x) (first block) or add_rmsnorm(x += down, ...)   x: the residual stream
    q, k, v = linears(h);  attn = attend(q, k, v)                   RoPE, cache write, GQA
    h = add_rmsnorm(x += o(attn));  g = silu_mul(gate(h), up(h));  down = down(g)

It runs where the runtime computes in float32, the activation is SiLU and lowbit's native
library is available and not switched off (``kernels.native.preferred``); whether decode
runs in float32 at all is ``kernels.autotune``'s measured choice (``eval.speed.runtime_dtype``).
``DecoderRuntime(native=False)`` keeps the torch operations. Its logits match the eager
step's to float32 rounding (``tests/runtime/test_native_step.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from lowbit.kernels import native

__all__ = ["NativeDecodeStep", "native_step_supported"]

_MAX_HEAD_DIM = 512  # decode_ops.c's RoPE buffer


def native_step_supported(spec, dtype: torch.dtype) -> str | None:
    """None when the fused step can run for ``spec`` in ``dtype``, else the reason why not."""
    if dtype is not torch.float32:
        return f"the runtime computes in {dtype}, the fused step in float32"
    if spec.act_fn is not F.silu:
        return "the MLP activation is not SiLU"
    if spec.head_dim % 2 or spec.head_dim > _MAX_HEAD_DIM:
        return f"head_dim {spec.head_dim} is odd or above {_MAX_HEAD_DIM}"
    if not native.preferred():
        return "lowbit's native kernels are not preferred here (kernels.native.preferred)"
    return None


def _merged(modules) -> Callable | None:
    """One prebound call for linears that read the same input, where they allow it
    (``QuantizedLinear.merged_decode_callable``), else None."""
    merge = getattr(type(modules[0]), "merged_decode_callable", None)
    return merge(list(modules), torch.float32) if callable(merge) else None


class NativeDecodeStep:
    """``step(input_ids, pos)``: the runtime's decode step (``[B, 1]`` ids at position
    ``pos``, the cache filled before it) with its small operations in C; returns logits."""

    def __init__(self, runtime):
        lib = native.library()
        self.rt = runtime
        self._rms, self._add_rms = lib.lowbit_rmsnorm, lib.lowbit_add_rmsnorm
        self._silu_mul, self._attend = lib.lowbit_silu_mul, lib.lowbit_attend
        spec = runtime.spec
        self._qkv_sizes = [spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2
        self._merged = [(_merged((m.q_proj, m.k_proj, m.v_proj)), _merged((m.gate_proj, m.up_proj)))
                        for m in spec.layers]

    def __call__(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        rt = self.rt
        spec, cache = rt.spec, rt.cache
        batch, n = input_ids.shape[0], spec.hidden_size
        heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        rms, add_rms, silu_mul, attend = self._rms, self._add_rms, self._silu_mul, self._attend
        x = spec.embed(input_ids).to(torch.float32).reshape(batch, n).contiguous()  # a copy
        h = torch.empty(batch, n)
        attn = torch.empty(batch, heads * dim)
        scores = torch.empty(batch * heads * (pos + 1))
        cos, sin = rt.cos[pos].contiguous(), rt.sin[pos].contiguous()
        rope = (pos, cache.max_len, cos.data_ptr(), sin.data_ptr())
        xp, hp, ap = x.data_ptr(), h.data_ptr(), attn.data_ptr()
        down = None
        for i, blk in enumerate(rt.blocks):
            if down is None:  # (the norm weights are float32 and contiguous: the runtime's)
                rms(xp, batch, n, blk.in_w.data_ptr(), blk.in_eps, hp)
            else:
                add_rms(xp, down.data_ptr(), batch, n, blk.in_w.data_ptr(), blk.in_eps, hp)
            qkv, gate_up = self._merged[i]
            if qkv is None:
                q, k, v = blk.q(h).contiguous(), blk.k(h).contiguous(), blk.v(h).contiguous()
            else:  # one GEMV for the three (one row: the slices are contiguous already)
                q, k, v = (t.contiguous() for t in qkv(h).split(self._qkv_sizes, -1))
            attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), batch, heads, kv_heads, dim, *rope,
                   cache.k[i].data_ptr(), cache.v[i].data_ptr(), spec.attn_scale, ap,
                   scores.data_ptr())
            o = blk.o(attn).contiguous()
            add_rms(xp, o.data_ptr(), batch, n, blk.post_w.data_ptr(), blk.post_eps, hp)
            if gate_up is None:
                g, u = blk.gate(h).contiguous(), blk.up(h).contiguous()
            else:
                g, u = (t.contiguous() for t in gate_up(h).chunk(2, -1))
            silu_mul(g.data_ptr(), u.data_ptr(), g.numel(), g.data_ptr())
            down = blk.down(g).contiguous()
        add_rms(xp, down.data_ptr(), batch, n, rt.final_w.data_ptr(), rt.final_eps, hp)
        return rt.lm_head(h)
