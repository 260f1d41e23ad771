"""A lean Llama-style decoder: static KV cache, one tight loop over the model's own modules.

:class:`DecoderRuntime` runs a Hugging Face Llama-style causal LM (see :mod:`.arch`) without
the framework around it: a preallocated KV cache, RoPE from a precomputed table, RMSNorm via
``F.rms_norm``, attention via ``F.scaled_dot_product_attention``, and activations in one dtype
(BF16 by default) from the embedding to the logits.

Linears are called as they are in the model: a plain ``nn.Linear`` runs as ``F.linear`` on a
weight cast once to the runtime dtype, and any other module (a quantized replacement whose
``forward(x)`` maps ``[..., K]`` to ``[..., N]``) is called as the module itself, fed
activations in the runtime dtype. The model is never modified.

Decode attends with the query heads of one KV head grouped as "rows" (``[B, Hkv, G, D]``), so
grouped-query attention needs neither ``repeat_kv`` nor a mask. ``compile=True`` wraps a
static-shape decode step (full-length cache plus an additive mask, positions as tensors) in
``torch.compile``; nothing compiles until the first call. In float32 on a CPU where lowbit's
native kernels run, the eager decode step runs its small operations fused in C
(:mod:`.native_step`), and a single-row decode runs the whole step as one native call where
every linear has a layout the loop reads (:mod:`.native_loop`); ``native=False`` keeps the
torch operations.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.formats.rotation import rotate
from lowbit.kernels.prefill_attention import rope
from lowbit.runtime.arch import DecoderSpec, UnsupportedModelError, resolve_decoder, rope_tables
from lowbit.runtime.cache import StaticKVCache
from lowbit.runtime.native_loop import NativeDecodeLoop, native_loop_supported
from lowbit.runtime.native_step import NativeDecodeStep, native_step_supported
from lowbit.runtime.prefill_ops import prefill_ops

__all__ = ["DecoderRuntime"]

Linear = Callable[[torch.Tensor], torch.Tensor]
PrefillGroup = Callable[[torch.Tensor], list[torch.Tensor]]


def _cast_output(module: nn.Module, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    return module(x).to(dtype)


def prepare_linear(module: nn.Module, in_features: int, dtype: torch.dtype) -> Linear:
    """A callable ``x -> y`` for one linear slot, with activations in ``dtype``.

    ``nn.Linear`` (exactly that class) becomes ``F.linear`` on weights cast to ``dtype``
    (shared, not copied, when they already are). Anything else is probed once with a
    ``[1, in_features]`` input and called as is; its output is cast to ``dtype`` if needed.
    A module with ``decode_callable(dtype)`` (``QuantizedLinear``) may hand back a prebound
    kernel call instead, which the loop then calls directly.
    """
    if type(module) is nn.Linear:
        weight = module.weight.detach().to(dtype)
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        return functools.partial(F.linear, weight=weight, bias=bias)
    with torch.inference_mode():
        out = module(torch.zeros(1, in_features, dtype=dtype))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        raise UnsupportedModelError(
            f"{type(module).__name__} does not map [1, {in_features}] to [1, N]: the runtime "
            "needs linear replacements whose forward(x) takes [..., K] and returns [..., N]"
        )
    fast = getattr(module, "decode_callable", None)
    fast = fast(dtype) if callable(fast) else None
    if fast is not None:
        return fast
    return module if out.dtype == dtype else functools.partial(_cast_output, module, dtype)


def _shared_rotation(modules: list[nn.Module]) -> str | None:
    """The input rotation every module of a group applies when all are ``QuantizedLinear``
    without outlier columns rotating the same way (q/k/v, gate/up read one vector), else
    None."""
    if any(type(m).__name__ != "QuantizedLinear" or m.outlier_index is not None
           for m in modules):
        return None
    rotations = {m.spec.rotation for m in modules}
    return rotations.pop() if len(rotations) == 1 and None not in rotations else None


def _after_rotation(module: nn.Module) -> Linear:
    """``module(x)`` for an ``x`` already rotated by the module's rotation (prefill rotates a
    shared input once for its group): its backend's forward on the codes."""
    return functools.partial(lambda m, x: m.backend.forward(x, m._state, m.bias), module)


def prefill_group(modules: list[nn.Module], singles: list[Linear]) -> PrefillGroup:
    """``f(x) == [m(x) for m in modules]`` for the layers that read one input in prefill:
    their backend's group call where it has one (W8A8: the input rotated and quantized once,
    in C), else the shared rotation applied once (``_shared_rotation``), else ``singles``
    (the prepared per-layer callables)."""
    group = getattr(type(modules[0]), "prefill_group_callable", None)
    group = group(modules) if group is not None else None
    if group is not None:
        return group
    rotation = _shared_rotation(modules)
    if rotation is None:
        return lambda x: [f(x) for f in singles]
    after = [_after_rotation(m) for m in modules]
    return lambda x: [f(y) for y in (rotate(x, rotation),) for f in after]


def _norm_params(module: nn.Module, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    weight = getattr(module, "weight", None)
    if weight is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no weight: not an RMSNorm")
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or eps
    return weight.detach().to(dtype), float(eps)


class _Block:
    """One decoder block's prepared callables and norm weights."""

    def __init__(self, spec: DecoderSpec, index: int, dtype: torch.dtype):
        mods = spec.layers[index]
        hidden, attn_dim = spec.hidden_size, spec.num_heads * spec.head_dim
        self.in_w, self.in_eps = _norm_params(mods.input_norm, spec.rms_norm_eps, dtype)
        self.post_w, self.post_eps = _norm_params(
            mods.post_attention_norm, spec.rms_norm_eps, dtype
        )
        self.q = prepare_linear(mods.q_proj, hidden, dtype)
        self.k = prepare_linear(mods.k_proj, hidden, dtype)
        self.v = prepare_linear(mods.v_proj, hidden, dtype)
        self.o = prepare_linear(mods.o_proj, attn_dim, dtype)
        self.gate = prepare_linear(mods.gate_proj, hidden, dtype)
        self.up = prepare_linear(mods.up_proj, hidden, dtype)
        self.down = prepare_linear(mods.down_proj, spec.intermediate_size, dtype)
        # prefill: the layers reading one input share its rotation (and W8A8's codes)
        self.prefill_qkv = prefill_group([mods.q_proj, mods.k_proj, mods.v_proj],
                                         [self.q, self.k, self.v])
        self.prefill_o = prefill_group([mods.o_proj], [self.o])
        self.prefill_gu = prefill_group([mods.gate_proj, mods.up_proj], [self.gate, self.up])
        self.prefill_down = prefill_group([mods.down_proj], [self.down])


class DecoderRuntime:
    """Prefill and greedy-decode a Llama-style model with a static KV cache.

    ``runtime.prefill(ids)`` starts a sequence (``ids``: ``[B, T]``) and returns logits;
    ``runtime.decode(ids)`` appends one token per row (``[B, 1]``) and returns ``[B, V]``
    logits. Logits come back in the runtime dtype. ``compile`` compiles the decode step
    (once per batch size and cache length), ``compile_prefill`` the prefill (once per shape).
    ``native``: run the eager decode step's small operations in C (:mod:`.native_step`);
    ``None`` = where supported, ``True`` = required (raises where not), ``False`` = never.
    ``decode_path`` says which step runs. ``activations``: the native loop's activations,
    ``"float"`` (reference), ``"int8"`` (per block of 32; VNNI or AVX2) or ``"auto"``
    (:mod:`.native_loop`); ``None``: no whole-step loop (the per-block fused step).
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype = torch.bfloat16,
                 compile: bool = False, compile_prefill: bool = False,
                 compile_options: dict | None = None, native: bool | None = None,
                 activations: str | None = "float"):
        self.spec = spec = resolve_decoder(model)
        self.dtype = dtype
        self.compile = compile
        self.compile_prefill = compile_prefill
        self.compile_options = compile_options  # passed to torch.compile(options=...)
        self.compile_seconds: float | None = None  # wall time of the latest compiling step
        self.compiles = 0  # how many times the decode step was (re)compiled
        self.blocks = [_Block(spec, i, dtype) for i in range(len(spec.layers))]
        self.final_w, self.final_eps = _norm_params(spec.final_norm, spec.rms_norm_eps, dtype)
        self.lm_head = prepare_linear(spec.lm_head, spec.hidden_size, dtype)
        self.cache: StaticKVCache | None = None
        self.length = 0
        self._tables_len = 0
        self._compiled_step: Callable | None = None
        self._compiled_prefill: Callable | None = None
        self.masks = torch.zeros(0, 0, dtype=dtype)
        why_not = "disabled (native=False)" if native is False else (
            "the decode step is compiled" if compile else native_step_supported(spec, dtype))
        if native and why_not:
            raise UnsupportedModelError(f"native decode step unavailable: {why_not}")
        self._native_step = None if why_not else NativeDecodeStep(self)
        self.decode_path = "native fused ops" if why_not is None else f"torch ops ({why_not})"
        self._native_loop = None
        self.native_loop_why: str | None = why_not or (
            "disabled (activations=None)" if activations is None
            else native_loop_supported(spec, dtype))
        if self.native_loop_why is None:
            self._native_loop = NativeDecodeLoop(self, activations)
            self.decode_path = (f"native loop ({self._native_loop.activations} activations; "
                                "batches > 1: native fused ops)")
        elif why_not is None:
            self.decode_path += f" (native loop: {self.native_loop_why})"

    # ---- set-up -------------------------------------------------------------------------------
    @property
    def engine_name(self) -> str:
        """``lowbit.runtime (<dtype>[, native decode loop[, int8 activations] | , fused C
        ops])``, for reports."""
        kind = {"native fused ops": ", fused C ops", "native loop": ", native decode loop"}.get(
            self.decode_path.split(" (")[0], "")
        if self._native_loop is not None and self._native_loop.activations == "int8":
            kind += ", int8 activations"
        return f"lowbit.runtime ({str(self.dtype).removeprefix('torch.')}{kind})"

    def _ensure(self, batch: int, max_len: int) -> None:
        spec = self.spec
        if spec.sliding_window is not None and max_len > spec.sliding_window:
            raise UnsupportedModelError(
                f"{max_len} positions exceed the sliding window {spec.sliding_window}, which "
                "lowbit.runtime does not implement"
            )
        cache = self.cache
        if cache is None or cache.batch != batch or cache.max_len < max_len:
            self.cache = StaticKVCache(len(self.blocks), batch, spec.num_kv_heads, max_len,
                                       spec.head_dim, self.dtype)
            self._compiled_step = None  # new cache tensors and shapes: compile again
        if self._tables_len < self.cache.max_len:
            cos, sin = rope_tables(spec, self.cache.max_len)
            half = spec.head_dim // 2
            sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # rotate_half as a roll
            self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
            self._tables_len = self.cache.max_len
        if self.compile and self.masks.shape[0] < self.cache.max_len:
            n = self.cache.max_len  # row p: additive mask letting position p see 0..p
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
            self.masks = torch.zeros(n, n, dtype=self.dtype).masked_fill(~allowed, float("-inf"))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope(x, cos, sin)  # x's last axis is head_dim

    # ---- prefill --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, *, max_len: int | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Reset the cache, run ``input_ids`` (``[B, T]``) and return logits.

        ``max_len`` is the cache length to reserve (default ``T``). Returns ``[B, T, V]``
        when ``all_logits`` else the last position's ``[B, V]``. With ``compile_prefill`` the
        forward is compiled once per distinct ``(B, T, all_logits)`` (minutes each).
        """
        batch, length = input_ids.shape
        if max_len is not None and length > max_len:
            raise ValueError(f"the prompt has {length} tokens, past the cache length {max_len}; "
                             "pass a larger max_len")
        self._ensure(batch, max(length, max_len or length))
        self.length = length
        if not self.compile_prefill:
            return self._prefill(input_ids, all_logits)
        if self._compiled_prefill is None:
            self._compiled_prefill = torch.compile(self._prefill, dynamic=False,
                                                  options=self.compile_options)
        return self._compiled_prefill(input_ids, all_logits)

    def _prefill(self, input_ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        spec, cache = self.spec, self.cache
        ops = prefill_ops(self)
        x = spec.embed(input_ids).to(self.dtype).contiguous()
        h = ops.norm(x, self.blocks[0].in_w, self.blocks[0].in_eps)
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.prefill_qkv(h)
            a = ops.attend(q, k, v, self.cos, self.sin, cache.k[i], cache.v[i], spec.attn_scale,
                           spec.num_heads)
            x, h = ops.add_norm(x, blk.prefill_o(a)[0], blk.post_w, blk.post_eps)
            gate, up = blk.prefill_gu(h)
            nxt = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
            x, h = ops.add_norm(x, blk.prefill_down(ops.glu(gate, up))[0],
                                nxt.in_w if nxt else self.final_w,
                                nxt.in_eps if nxt else self.final_eps)
        if not all_logits:
            h = h[:, -1]
        return self.lm_head(h)

    # ---- decode ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[B, 1]``) and return the next-token logits ``[B, V]``."""
        cache = self.cache
        if cache is None or self.length == 0:
            raise RuntimeError("call prefill() before decode()")
        if self.length >= cache.max_len:
            raise RuntimeError(f"KV cache full ({cache.max_len} positions); pass a larger "
                               "max_len to prefill()")
        pos = self.length
        self.length += 1
        if self._native_loop is not None and input_ids.shape == (1, 1):
            return self._native_loop(input_ids, pos)
        if self._native_step is not None:
            return self._native_step(input_ids, pos)
        if not self.compile:
            return self._decode_eager(input_ids, pos)
        if self._compiled_step is None:
            start = time.perf_counter()
            self._compiled_step = torch.compile(self._decode_static, dynamic=False,
                                                options=self.compile_options)
            out = self._compiled_step(input_ids, torch.tensor([pos]))
            self.compile_seconds = time.perf_counter() - start
            self.compiles += 1
            return out
        return self._compiled_step(input_ids, torch.tensor([pos]))

    def _decode_eager(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        spec, cache = self.spec, self.cache
        batch = input_ids.shape[0]
        kv_heads, dim = spec.num_kv_heads, spec.head_dim
        group = spec.num_heads // kv_heads
        cos, sin = self.cos[pos], self.sin[pos]
        x = spec.embed(input_ids).to(self.dtype)
        for i, blk in enumerate(self.blocks):
            h = F.rms_norm(x, (x.shape[-1],), blk.in_w, blk.in_eps)
            q = self._rope(blk.q(h).view(batch, kv_heads, group, dim), cos, sin)
            k = self._rope(blk.k(h).view(batch, kv_heads, 1, dim), cos, sin)
            k_all, v_all = cache.k[i], cache.v[i]
            k_all.narrow(2, pos, 1).copy_(k)
            v_all.narrow(2, pos, 1).copy_(blk.v(h).view(batch, kv_heads, 1, dim))
            a = F.scaled_dot_product_attention(
                q, k_all.narrow(2, 0, pos + 1), v_all.narrow(2, 0, pos + 1),
                scale=spec.attn_scale,
            )
            x = x + blk.o(a.view(batch, 1, -1))
            h = F.rms_norm(x, (x.shape[-1],), blk.post_w, blk.post_eps)
            gate, up = blk.prefill_gu(h)
            x = x + blk.down(spec.act_fn(gate) * up)
        x = F.rms_norm(x[:, 0], (x.shape[-1],), self.final_w, self.final_eps)
        return self.lm_head(x)

    def _decode_static(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Decode step with static shapes (full cache + mask), for ``torch.compile``."""
        spec, cache = self.spec, self.cache
        batch = input_ids.shape[0]
        kv_heads, dim = spec.num_kv_heads, spec.head_dim
        group = spec.num_heads // kv_heads
        cos, sin = self.cos[pos], self.sin[pos]  # [1, D]
        mask = self.masks[pos][:, : cache.max_len]  # [1, max_len]
        x = spec.embed(input_ids).to(self.dtype)
        for i, blk in enumerate(self.blocks):
            h = F.rms_norm(x, (x.shape[-1],), blk.in_w, blk.in_eps)
            q = self._rope(blk.q(h).view(batch, kv_heads, group, dim), cos, sin)
            k = self._rope(blk.k(h).view(batch, kv_heads, 1, dim), cos, sin)
            cache.k[i].index_copy_(2, pos, k)
            cache.v[i].index_copy_(2, pos, blk.v(h).view(batch, kv_heads, 1, dim))
            a = F.scaled_dot_product_attention(
                q, cache.k[i], cache.v[i], attn_mask=mask, scale=spec.attn_scale
            )
            x = x + blk.o(a.view(batch, 1, -1))
            h = F.rms_norm(x, (x.shape[-1],), blk.post_w, blk.post_eps)
            gate, up = blk.prefill_gu(h)
            x = x + blk.down(spec.act_fn(gate) * up)
        x = F.rms_norm(x[:, 0], (x.shape[-1],), self.final_w, self.final_eps)
        return self.lm_head(x)
