"""The whole decode step in one native call (``csrc/decode_loop.c``): no Python per layer.

:class:`NativeDecodeLoop` describes a :class:`DecoderRuntime`'s model to C once (a
``lb_model`` descriptor: per layer the norm weights, the KV cache and seven linears, each
by pointers into the tensors the model already holds) and then runs each single-row decode
token as one call: every block, the final norm and the output head, threads split inside.

Linear layouts it reads (``lowbit_native.h``):

- ``nn.Linear`` (float32): ``LB_F32``;
- ``QuantizedLinear`` on the ``int8_weight`` backend (``w8``): ``LB_I8``, its own int8 codes
  and float32 scales;
- ``QuantizedLinear`` on ``dequant`` with int8 codes in groups of 32 (``gguf:q8_0``, the
  Q8_0 heads of ``gguf:`` recipes): ``LB_I8G``, the codes unpacked once;
- ``QuantizedLinear`` on ``int4_weight`` (``w4g32``, ``gguf:q4_0``): ``LB_I4T``, torch's
  packed layout as it is; with int8 activations an ``LB_Q4R`` copy instead (the same codes
  in Q4_0's nibble order, rows in groups of four so that the kernel's four-row dot products
  read one sequential stream, the kernel's bf16 scales and zeros per 32 inputs), and on
  AVX512-VNNI an ``LB_Q4C`` copy in tiles of 16 rows (``native_tiles``; int8 weights, the
  ``LB_I8`` / ``LB_I8G`` layers, likewise become ``LB_I8C``, and IQ4_NL, whose table holds
  integers, ``LB_L4C``);
- lookup formats of at most 4 bits (``nf4g64``, ``kmeans4``, codebooks): ``LB_LUT4``, the
  codes with their float tables; with int8 activations an ``LB_LUT4Q`` copy instead (each
  table rounded to int16 against its largest value, a relative change of at most 2^-16,
  for ``vpshufb`` lookups and exact integer sums: ``csrc/lut_gemv.c``);
- any other ``QuantizedLinear`` on ``dequant`` without a rotation (5/6-bit codes, the
  k-quants' super-blocks: ``Q5_K`` / ``Q6_K`` layers of ``gguf:`` mixes): ``LB_F32`` on its
  dequantized weight, 4 bytes per weight but the same numbers;
- ``QuantizedLinear`` on ``int8_dynamic`` / ``int8_static`` (``w8a8``, ``w8a8-static``,
  ``w4a8``): ``LB_W8A8``, its int8 codes; the input quantized per token (or with the
  calibrated scale) whatever ``activations`` says, as the recipe defines it.

A layer that rotates its input (``-rot`` recipes, ``w8a8``) carries its Kronecker factors:
each thread rotates the input itself and prepares its own activations, with no barrier.

``activations``: ``"float"`` (float32 activations into lowbit's AVX2 GEMVs: the reference,
logits within float32 rounding of the Python runtime), ``"int8"`` (activations quantized
to int8 per block of 32 as llama.cpp's Q8_0, integer dot products with AVX512-VNNI where
the CPU has it, else AVX2's vpmaddubsw) or ``"auto"`` (``"int8"`` where it measured faster
on one block's MLP and the output head, else ``"float"``). ``native_loop_supported`` says
why a model cannot run here; the runtime then keeps its per-layer step.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import time

import torch
from torch import nn

from lowbit.kernels import native
from lowbit.runtime import native_tiles
from lowbit.runtime.native_layouts import Unsupported, lut4, lut4q, q4r

__all__ = ["NativeDecodeLoop", "native_loop_supported", "has_vnni", "linear_descriptor"]

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
F32, I8, I8G, I4T, Q4R, W8A8, LUT4, LUT4Q, Q4C, I8C, L4C = range(11)


class LbLinear(ctypes.Structure):
    _fields_ = [(n, _I) for n in ("kind", "n", "k", "ld", "np", "block", "kg")] + [
        (n, _P) for n in ("w", "s", "z", "bias", "scratch")] + [
        ("nf", _I), ("sizes", _P), ("factors", _P), ("act_scale", _F)]


class LbLayer(ctypes.Structure):
    _fields_ = [(n, LbLinear) for n in ("q", "k", "v", "o", "gate", "up", "down")] + [
        (n, _P) for n in ("in_norm", "post_norm", "kcache", "vcache")] + [
        ("in_eps", _F), ("post_eps", _F)]


class LbModel(ctypes.Structure):
    _fields_ = [(n, _I) for n in ("n_layers", "hidden", "inter", "heads", "kv_heads",
                                  "head_dim", "max_len", "vocab", "q8", "threads")] + [
        (n, _P) for n in ("final_norm", "cos", "sin", "layers", "head", "work")] + [
        ("attn_scale", _F), ("final_eps", _F)]


@functools.cache
def _lib():
    lib = native.library()
    for name, args, res in (("lowbit_decode_step", [_P, _P, _I, _P], None),
                            ("lowbit_linear_apply", [_P, _P, _P, _I], None),
                            ("lowbit_loop_work_floats", [_P], _I),
                            ("lowbit_loop_has_vnni", [], _I),
                            ("lowbit_loop_isa", [_I], _I),
                            ("lowbit_q8_quantize", [_P, _I, _P], None),
                            ("lowbit_q8_floats", [_I], _I)):
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, res
    return lib


def has_vnni() -> bool:
    """Whether the int8-activation kernels run on AVX512-VNNI here (AVX512 F/BW/VL/DQ +
    VNNI); without it they run on AVX2."""
    return native.available() and bool(_lib().lowbit_loop_has_vnni())


@contextlib.contextmanager
def avx2_only():
    """Inside the block the int8 kernels take their AVX2 path even where VNNI exists (tests,
    and timing what an AVX2-only CPU runs); the setting is restored on exit."""
    before = _lib().lowbit_loop_isa(0)
    try:
        yield
    finally:
        _lib().lowbit_loop_isa(before)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bytes(d: LbLinear) -> int:
    """Bytes of one linear's weights in its layout."""
    if d.kind == F32:
        return d.n * d.k * 4
    if d.kind in (I8, I8G, W8A8):
        return d.n * d.ld + 4 * d.n * (1 if d.kind == I8 else d.k // 32)
    if d.kind == I4T:
        return d.np * d.ld // 2 + 4 * d.np * (d.ld // d.kg)
    if d.kind == LUT4:  # codes and the scales or per-row tables
        return d.n * d.ld + 4 * d.n * -(-2 * d.ld // d.kg) * (16 if d.block else int(bool(d.s)))
    if d.kind == LUT4Q:  # codes, scales and the per-row int16 tables
        return d.n * d.ld + d.n * -(-2 * d.ld // d.kg) * (4 + (32 if d.block else 0))
    n16 = -(-d.n // 16) * 16
    if d.kind == Q4C:  # codes, bf16 scales (and zeros) per 32 inputs
        return n16 * d.ld * (16 + 2 * (2 if d.z else 1))
    if d.kind == L4C:  # codes, float16 scales per 32 inputs
        return n16 * d.ld * (16 + 2)
    if d.kind == I8C:
        return n16 * d.ld * 32 + 4 * (n16 * d.ld if d.kg else n16)
    return d.n * d.ld + 2 * d.n * (2 * d.ld // 32) * (2 if d.z else 1)


def linear_descriptor(module: nn.Module, in_features: int, q8: bool) -> tuple[LbLinear, tuple]:
    """The ``lb_linear`` of one linear slot and the tensors behind its pointers (keep them
    alive); raises ``Unsupported`` for a layer the loop has no layout for."""
    desc, keep = LbLinear(), ()
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float().contiguous()
    if type(module) is nn.Linear:
        w = module.weight.detach().float().contiguous()
        desc.kind, desc.ld, desc.w, keep = F32, w.shape[1], w.data_ptr(), (w,)
        desc.n, desc.k = w.shape
    elif type(module).__name__ == "QuantizedLinear":
        if module.outlier_index is not None:
            raise Unsupported("outlier columns")
        name, state = module.backend.name, module._state
        desc.n, desc.k = module.out_features, module.in_features
        if module.spec.rotation is not None:  # each thread rotates the input (kron_rotate)
            from lowbit.nn.backends import _factors

            desc.nf, sizes, flat = native.factor_args(_factors(desc.k, module.spec.rotation))
            desc.sizes, desc.factors, keep = sizes.data_ptr(), flat.data_ptr(), (sizes, flat)
        tiles = native_tiles.lookup_tiles(state) if name == "dequant" and q8 and \
            has_vnni() else None
        lut = lut4(module, name, state) if name in ("dequant", "codebook") and \
            tiles is None else None
        if tiles is not None:  # IQ4_NL: its int8 table by vpshufb
            codes, table, s, desc.ld = tiles
            desc.kind, desc.w, desc.s, desc.z = L4C, codes.data_ptr(), s.data_ptr(), \
                table.data_ptr()
            keep = (*keep, codes, table, s)
        elif lut is not None:
            codes, table, scales, desc.kg, desc.block = lut
            if q8:
                table, scales = lut4q(table, scales, desc.n, -(-2 * codes.shape[1] // desc.kg))
            desc.kind, desc.ld, desc.w, desc.z = LUT4Q if q8 else LUT4, codes.shape[1], \
                codes.data_ptr(), table.data_ptr()
            desc.s, keep = _ptr(scales), (*keep, codes, table, scales)
        elif name in ("int8_dynamic", "int8_static"):
            kern = state[0]
            static = name == "int8_static"
            desc.kind, desc.ld, desc.w = W8A8, kern.qdata.shape[1], kern.qdata.data_ptr()
            desc.s = (kern.out_scale if static else kern.scale).data_ptr()
            desc.act_scale, keep = (float(kern.act_scale) if static else 0.0), (*keep, kern)
        elif name == "int8_weight" and q8 and has_vnni():
            tiles, s, desc.ld = native_tiles.i8c(state.qdata[:, :desc.k], state.scale, False)
            desc.kind, desc.w, desc.s, keep = I8C, tiles.data_ptr(), s.data_ptr(), (*keep, tiles, s)
        elif name == "int8_weight":
            desc.kind, desc.ld = I8, state.qdata.shape[1]
            desc.w, desc.s = state.qdata.data_ptr(), state.scale.data_ptr()
            keep = (*keep, state)
        elif name == "int4_weight" and q8 and has_vnni():
            codes, s, z, desc.ld = native_tiles.q4c(state[0])
            desc.kind, keep = Q4C, (*keep, codes, s, z)
            desc.w, desc.s, desc.z = codes.data_ptr(), s.data_ptr(), _ptr(z)
        elif name == "int4_weight" and q8:
            codes, s, z = q4r(state[0])
            desc.kind, desc.ld, keep = Q4R, codes.shape[1], (*keep, codes, s, z)
            desc.w, desc.s, desc.z = codes.data_ptr(), s.data_ptr(), _ptr(z)
        elif name == "int4_weight" and state[0].layout[1]:
            kern = state[0]
            kp = kern.packed.shape[1] * 2
            scratch = torch.empty(kp // 2 + kp // kern.kernel_group_size + 1)
            desc.kind, desc.ld, desc.np, desc.block = I4T, kp, kern.packed.shape[0], kern.layout[0]
            desc.kg, desc.w, desc.s = kern.kernel_group_size, kern.packed.data_ptr(), \
                kern.scales_and_zeros.data_ptr()
            desc.scratch, keep = scratch.data_ptr(), (*keep, kern, scratch)
        elif (name == "dequant" and state.qparams.format.name == "int8"
              and state.qparams.zero_point is None and desc.k % 32 == 0
              and state.qparams.granularity.kind == "group"
              and state.qparams.granularity.group_size == 32):
            codes = state.codes().to(torch.int8).contiguous()
            s = state.qparams.scale.float().reshape(desc.n, desc.k // 32).contiguous()
            desc.kind, desc.ld, desc.w, desc.s = I8G, desc.k, codes.data_ptr(), s.data_ptr()
            if q8 and has_vnni():
                codes, s, desc.ld = native_tiles.i8c(codes, s, True)
                desc.kind, desc.kg, desc.w, desc.s = I8C, 32, codes.data_ptr(), s.data_ptr()
            keep = (*keep, codes, s)
        elif name == "dequant" and module.spec.rotation is None:
            # a grid with no packed layout here (5/6-bit codes, k-quant super-blocks: the
            # Q5_K / Q6_K layers of gguf: mixes): its dequantized float32 weight, the numbers
            # the dequant backend multiplies, so one such layer keeps the loop native
            w = module.dequantize_weight(torch.float32).contiguous()
            desc.kind, desc.ld, desc.w, keep = F32, desc.k, w.data_ptr(), (*keep, w)
        else:
            raise Unsupported(f"{name} backend for {module.spec.format} "
                              f"{module.spec.granularity} has no native loop layout")
    else:
        raise Unsupported(f"{type(module).__name__} is neither nn.Linear nor QuantizedLinear")
    if desc.k != in_features:
        raise Unsupported(f"takes {desc.k} inputs, the slot {in_features}")
    desc.bias = _ptr(bias)
    return desc, (*keep, bias)


def native_loop_supported(spec, dtype: torch.dtype) -> str | None:
    """None when the native loop can run ``spec``'s model in ``dtype``, else why not."""
    from lowbit.runtime.native_step import native_step_supported

    why = native_step_supported(spec, dtype)
    if why:
        return why
    try:
        _descriptors(spec, q8=False)
    except Unsupported as exc:
        return str(exc)
    return None


def _descriptors(spec, q8: bool) -> tuple[list, LbLinear, list]:
    hidden, attn, inter = spec.hidden_size, spec.num_heads * spec.head_dim, spec.intermediate_size
    inputs = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": attn,
              "gate_proj": hidden, "up_proj": hidden, "down_proj": inter}
    layers, keep = [], []
    for i, mods in enumerate(spec.layers):
        descs = {}
        for slot, k in inputs.items():
            try:
                descs[slot], kept = linear_descriptor(getattr(mods, slot), k, q8)
            except Unsupported as exc:
                raise Unsupported(f"layer {i} {slot}: {exc}") from None
            keep.append(kept)
        layers.append(descs)
    try:
        head, kept = linear_descriptor(spec.lm_head, hidden, q8)
    except Unsupported as exc:
        raise Unsupported(f"lm_head: {exc}") from None
    keep.append(kept)
    return layers, head, keep


def _seconds(linears: list[LbLinear], q8: int, rounds: int = 7) -> float:
    """Median time of running ``linears`` once each (``lowbit_linear_apply``)."""
    xs = [torch.randn(d.k, generator=torch.Generator().manual_seed(0)) for d in linears]
    ys = [torch.empty(d.n) for d in linears]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for d, x, y in zip(linears, xs, ys, strict=True):
            _lib().lowbit_linear_apply(ctypes.byref(d), x.data_ptr(), y.data_ptr(), q8)
        times.append(time.perf_counter() - start)
    return sorted(times)[rounds // 2]


#: ``"auto"``'s answers in this process, by what was timed (layouts, shapes, threads, ISA)
_AUTO: dict[tuple, bool] = {}


def _measured(spec) -> tuple[bool, tuple]:
    """``"auto"``'s choice: int8 activations (True) where one block's MLP and the output
    head run faster with them than with float32 activations on this machine (the two timed
    in alternating rounds); with the chosen descriptors. The answer is kept for the process,
    so every runtime of a model in it computes the same numbers."""
    (l8, h8, k8), (lf, hf, kf) = _descriptors(spec, True), _descriptors(spec, False)
    ints = [l8[0]["gate_proj"], l8[0]["down_proj"], h8]
    floats = [lf[0]["gate_proj"], lf[0]["down_proj"], hf]
    key = (tuple((d.kind, d.n, d.k, d.kg, d.block) for d in ints + floats),
           torch.get_num_threads(), has_vnni())
    if key not in _AUTO:
        times: dict[bool, list] = {True: [], False: []}
        for _ in range(5):
            times[True].append(_seconds(ints, 1, rounds=3))
            times[False].append(_seconds(floats, 0, rounds=3))
        _AUTO[key] = sorted(times[True])[2] < sorted(times[False])[2]
    q8 = _AUTO[key]
    return q8, ((l8, h8, k8) if q8 else (lf, hf, kf))


class NativeDecodeLoop:
    """``loop(input_ids, pos)``: the runtime's decode step for one row (``[1, 1]`` ids at
    position ``pos``, the cache filled before it) as one native call; returns ``[1, V]``
    float32 logits. ``activations``: ``"float"``, ``"int8"`` or ``"auto"`` (module doc)."""

    def __init__(self, runtime, activations: str = "float"):
        if activations not in ("float", "int8", "auto"):
            raise ValueError(f"activations must be 'float', 'int8' or 'auto', got {activations!r}")
        self.rt, spec = runtime, runtime.spec
        q8 = activations != "float"
        if activations == "auto":
            q8, (layers, head, self._keep) = _measured(spec)
        else:
            layers, head, self._keep = _descriptors(spec, q8)
        self.activations = "int8" if q8 else "float"
        self._layers = (LbLayer * len(layers))()
        for i, (descs, blk) in enumerate(zip(layers, runtime.blocks, strict=True)):
            lay = self._layers[i]
            for slot, desc in descs.items():
                setattr(lay, slot.removesuffix("_proj"), desc)
            lay.in_norm, lay.in_eps = blk.in_w.data_ptr(), blk.in_eps
            lay.post_norm, lay.post_eps = blk.post_w.data_ptr(), blk.post_eps
        self._head = head
        m = self.model = LbModel()
        m.n_layers, m.hidden, m.inter = len(layers), spec.hidden_size, spec.intermediate_size
        m.heads, m.kv_heads, m.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        m.vocab, m.q8, m.attn_scale = head.n, int(q8), spec.attn_scale
        m.final_norm, m.final_eps = runtime.final_w.data_ptr(), runtime.final_eps
        m.layers, m.head = ctypes.addressof(self._layers), ctypes.addressof(self._head)
        embed = spec.embed
        self._embed = (embed.weight.detach() if type(embed) is nn.Embedding
                       and embed.weight.dtype is torch.float32
                       and embed.weight.is_contiguous() else None)
        self._bound = None

    def weight_bytes(self) -> int:
        """Bytes of weights (codes, scales, zeros, biases aside) one decode step reads."""
        descs = [getattr(lay, f) for lay in self._layers for f in
                 ("q", "k", "v", "o", "gate", "up", "down")] + [self._head]
        return sum(_bytes(d) for d in descs)

    def _bind(self) -> None:
        """Point the descriptor at the runtime's current cache and RoPE tables."""
        rt, m = self.rt, self.model
        key = (id(rt.cache), rt.cos.data_ptr(), torch.get_num_threads())
        if key == self._bound:
            return
        m.max_len, m.cos, m.sin = rt.cache.max_len, rt.cos.data_ptr(), rt.sin.data_ptr()
        m.threads = torch.get_num_threads()  # the work below holds one residual per thread
        for i, lay in enumerate(self._layers):
            lay.kcache, lay.vcache = rt.cache.k[i].data_ptr(), rt.cache.v[i].data_ptr()
        self._work = torch.empty(_lib().lowbit_loop_work_floats(ctypes.byref(m)))
        m.work = self._work.data_ptr()
        self._bound = key

    def __call__(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        rt = self.rt
        if input_ids.shape != (1, 1):
            raise ValueError("the native loop decodes one token of one row, got "
                             f"{tuple(input_ids.shape)}")
        if not 0 <= pos < rt.cache.max_len:
            raise ValueError(f"position {pos} is past the KV cache ({rt.cache.max_len} "
                             "positions)")
        self._bind()
        if self._embed is not None:  # the embedding row in place: no copy
            row = int(input_ids[0, 0])
            x = self._embed[row]
        else:
            x = rt.spec.embed(input_ids).float().reshape(-1).contiguous()
        logits = torch.empty(1, self.model.vocab)
        _lib().lowbit_decode_step(ctypes.byref(self.model), x.data_ptr(), pos,
                                  logits.data_ptr())
        return logits
