"""Weight-only group-wise 4-bit linear (also 2- and 3-bit codes) on torch's int4 CPU kernel.

lowbit's convention (``lowbit.formats.scaling``, Jacob et al., 2018, eq. 1): the weight of
output channel ``n``, input ``k`` in group ``g = k // group_size`` is

    w[n, k] = (d[n, k] - zero_point[n, g]) * scale[n, g]

where ``d`` is the decoded code: ``0..15`` for unsigned codes (uint8 tensors, as the
``uint4``/``uint3``/``uint2`` formats produce), ``-8..7`` for signed codes (int8 tensors).
Symmetric layers pass ``zero_point=None``: 0 for signed codes, 8 for unsigned ones (the
uint4 midpoint; unsigned 2/3-bit codes pass their zero-point explicitly).
GGUF-style offsets (``w = d * scale + offset``, Q4_1's ``d * q + m``) pass ``offset``.

The kernel, ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)``
(aten/src/ATen/native/cpu/int4mm_kernel.cpp, the CPU port of "tinygemm"), stores an
unsigned nibble ``u`` per weight and computes ``w = (u - 8) * sz[g, n, 0] + sz[g, n, 1]``
with ``sz`` of shape ``[K // group, N, 2]`` in the activation dtype. With ``u = d + c``
(``c = 8`` for signed codes, 0 for unsigned) the mapping is exact algebra:

    sz[..., 0] = scale,    sz[..., 1] = (8 - c - zero_point) * scale    (or 8 * scale + offset)

so unsigned asymmetric codes get ``zero = (8 - zero_point) * scale`` and symmetric layers
get ``zero = 0``. Only the rounding of ``scale`` and ``zero`` to bf16 (unit roundoff 2^-8)
moves the weight: by at most ``(|u - 8| + |zero / scale|) * 2^-8 <= 1/16`` of a step at
the extreme codes, about 1/100 of a step typically; ``tests/kernels`` check it.

Kernel constraints (torch 2.13) and what the wrapper does about them:
- AVX-512 code only for **bf16** activations (fp32 runs a scalar loop ~40x slower): the
  wrapper casts ``x`` to bf16 and returns ``x``'s dtype.
- group size 32, 64, 128 or 256 and ``K % group == 0``: a layer whose ``K`` is not a multiple
  of its group (SmolLM2's 576 with group 128) gets its weight zero-padded along ``K`` at
  prepare time and its activation zero-padded per call; the group size never changes.
  Groups that are multiples of 32 (or per-channel, ``group_size=None``) run with a kernel
  group that divides them and repeated scales: the same numbers, no approximation.
- ``N % 16 == 0``: other ``N`` get zero rows that the wrapper slices off.
- The packed layout depends on the CPU's SIMD width (64-row blocks on AVX-512, 32 on AVX2;
  ``state.layout`` records it): save the codes (``unpack_int4_codes``, bit-exact) and
  re-``prepare`` on load, or save ``packed`` with its layout tag and pass the loaded state
  through ``relayout_int4_weight``.

2- and 3-bit codes run on the same kernel (they fit in a nibble), which then still reads 4
bits per weight: their storage can be smaller elsewhere, their decode speed cannot.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from lowbit.formats.rotation import rotate
from lowbit.kernels import choices, native
from lowbit.kernels._common import (
    KernelError,
    check_bias,
    check_input,
    check_weight,
    use_fast,
)

FAMILY = "int4_weight"
FAST = "int4_weight.int4pack_mm"
NATIVE = "int4_weight.native_avx2_gemv"
PREFILL = "int4_weight.dequant_bf16_linear"
PREFILL_FP32 = "int4_weight.dequant_fp32_linear"
#: from this many rows on, ``impl="auto"`` dequantizes the weight (with the kernel's own
#: bf16 scales and zeros, so the numbers are the same) and runs the CPU's fastest float GEMM:
#: at 512x576x1536 the kernel takes 3.0 ms vs 1.4 ms for bf16 ``F.linear`` on AVX-512 BF16
#: (an Intel Xeon), and 18 ms vs 6 + 2 ms (dequantize) for fp32 on AVX2
PREFILL_ROWS = 32
#: rows packed at a time (a multiple of every layout's 64- or 32-row blocks), so packing
#: SmolLM2's 49152-row head holds int32 nibbles of 4096 rows, not of all of them
PACK_ROWS = 4096
REFERENCE = "int4_weight.reference"
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
_BF16 = torch.bfloat16
_INT4PACK_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


@dataclass(frozen=True, slots=True)
class Int4WeightState:
    """Prepared 4-bit layer.

    packed: uint8 ``[N_padded, K_padded // 2]`` in the kernel's (CPU-dependent) layout.
    scales_and_zeros: bfloat16 ``[K_padded // kernel_group_size, N_padded, 2]``.
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    in_features: int
    out_features: int
    group_size: int
    kernel_group_size: int
    signed: bool
    layout: tuple[int, bool]

    @property
    def k_padding(self) -> int:
        return self.packed.shape[1] * 2 - self.in_features

    @property
    def n_padding(self) -> int:
        return self.packed.shape[0] - self.out_features


def _kernel_group(group_size: int, k: int) -> int:
    """The kernel group that runs ``group_size`` exactly (a divisor of it), or raise."""
    if group_size >= k:  # one group per row: any kernel group works; least padding wins
        return min(KERNEL_GROUP_SIZES, key=lambda g: ((-k) % g, -g))
    for g in KERNEL_GROUP_SIZES:
        if group_size % g == 0:
            return g
    raise KernelError(
        f"{FAMILY}: group_size {group_size} cannot run on _weight_int4pack_mm_for_cpu, whose "
        f"groups are 32, 64, 128 or 256 elements: use a group size that is a multiple of 32 "
        f"(or per-channel), or dequantize and use a float matmul"
    )


def prepare_int4_weight(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    group_size: int | None,
    offset: torch.Tensor | None = None,
) -> Int4WeightState:
    """Pack codes ``[N, K]`` with ``scale``/``zero_point`` ``[N, ceil(K / group_size)]``.

    ``qdata`` is uint8 (codes 0..15) or int8 (codes -8..7); ``group_size=None`` means one
    group per output channel (``scale`` of shape ``[N]`` or ``[N, 1]``). Pass at most one of
    ``zero_point`` (``w = (d - zero_point) * scale``) and ``offset`` (``w = d * scale +
    offset``). Cost: one pass over the weight plus torch's packing kernel.
    """
    if qdata.dim() == 2 and qdata.dtype not in (torch.uint8, torch.int8):
        raise KernelError(
            f"{FAMILY}: codes must be uint8 (0..15) or int8 (-8..7), got {qdata.dtype}"
        )
    n, k = check_weight(qdata, qdata.dtype, FAMILY)
    signed = qdata.dtype == torch.int8
    group = k if group_size is None else int(group_size)
    if group < 1:
        raise KernelError(f"{FAMILY}: group_size must be >= 1 or None, got {group_size}")
    n_groups = -(-k // group)
    params = _check_params(scale, zero_point, offset, n, n_groups)
    kg = _kernel_group(group, k)
    k_pad, n_pad = (-k) % kg, (-n) % 16

    lo, hi = torch.aminmax(qdata)
    shift = 8 if signed else 0
    if int(lo) + shift < 0 or int(hi) + shift > 15:
        raise KernelError(
            f"{FAMILY}: {'signed' if signed else 'unsigned'} codes must lie in "
            f"{'-8..7' if signed else '0..15'}, found {int(lo)}..{int(hi)}"
        )
    packed = torch.cat([_pack_rows(qdata[i:i + PACK_ROWS], shift, k_pad,
                                   n_pad if i + PACK_ROWS >= n else 0)
                        for i in range(0, n, PACK_ROWS)])

    s, zero = _scales_and_zeros(params, signed)  # float32 [N, n_groups] each
    col = torch.arange((k + k_pad) // kg) * kg // group  # layer group of each kernel group
    col = col.clamp_max(n_groups - 1)
    sz = torch.stack([s[:, col], zero[:, col]], dim=-1)  # [N, G_kernel, 2]
    sz = torch.nn.functional.pad(sz, (0, 0, 0, 0, 0, n_pad))
    sz = sz.transpose(0, 1).contiguous().to(_BF16)
    return Int4WeightState(packed, sz, k, n, group, kg, signed, _layout())


def _pack_rows(codes: torch.Tensor, shift: int, k_pad: int, n_pad: int) -> torch.Tensor:
    """torch's packing of some rows (a multiple of the layout's row blocks, or the last rows):
    the packed rows of a slice are the same bytes as that slice of the whole packed weight."""
    nibbles = codes.to(torch.int32) + shift
    # padding nibbles are 8 (weight 0 when zero is 0); padded K meets zero activations anyway
    nibbles = torch.nn.functional.pad(nibbles, (0, k_pad, 0, n_pad), value=8)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.contiguous(), 1)


def _check_params(scale, zero_point, offset, n: int, n_groups: int) -> tuple:
    if zero_point is not None and offset is not None:
        raise KernelError(f"{FAMILY}: pass zero_point or offset, not both")
    out = []
    for name, t in (("scale", scale), ("zero_point", zero_point), ("offset", offset)):
        if t is not None and t.numel() != n * n_groups:
            raise KernelError(
                f"{FAMILY}: {name} must have shape [{n}, {n_groups}] (output channels x "
                f"ceil(K / group_size) groups), got {tuple(t.shape)}"
            )
        t = None if t is None else t.detach().reshape(n, n_groups).float()
        if t is not None and not torch.isfinite(t).all():
            raise KernelError(f"{FAMILY}: {name} contains NaN or Inf")
        out.append(t)
    return tuple(out)


def _scales_and_zeros(params: tuple, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (scale, zero) for lowbit's parameters: see the module docstring."""
    scale, zero_point, offset = params
    shift = 0.0 if signed else 8.0  # 8 - c: kernel value u - 8 equals d - shift
    if offset is not None:
        return scale, shift * scale + offset
    if zero_point is None:
        return scale, torch.zeros_like(scale)
    return scale, (shift - zero_point) * scale


@functools.cache
def _layout() -> tuple[int, bool]:
    """Find how ``_convert_weight_to_int4pack_for_cpu`` lays out nibbles in this process.

    Rows go in blocks of ``block`` (64 on AVX-512, 32 on AVX2); for each ``k`` a full block
    stores row ``r`` in the low nibble and row ``r + block / 2`` in the high nibble of byte
    ``r`` (``interleaved``), while a short last block (and every block without SIMD) packs
    neighbouring rows ``2j, 2j + 1`` into byte ``j``. Probed once, on first use.
    """
    probe = torch.randint(0, 16, (144, 4), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.int(), 1)
    for layout in ((64, True), (32, True), (32, False), (16, False), (64, False)):
        if torch.equal(_unpack(packed, 144, 4, layout).int(), probe.int()):
            return layout
    raise KernelError(
        f"{FAMILY}: this torch build packs int4 weights in a layout lowbit does not know "
        f"(CPU capability {torch.backends.cpu.get_cpu_capability()}); dequantize the codes "
        f"and use a float matmul instead"
    )


def _unpack(packed: torch.Tensor, n: int, k: int, layout: tuple[int, bool]) -> torch.Tensor:
    """Invert the kernel layout: uint8 nibbles ``[n, k]``."""
    block, interleaved = layout
    flat = packed.reshape(-1)
    full = n // block if interleaved else 0
    parts = []
    if full:
        b = flat[: full * k * block // 2].view(full, k, block // 2)
        rows = torch.cat([b & 15, b >> 4], dim=-1)  # [full, k, block]: rows in order
        parts.append(rows.permute(0, 2, 1).reshape(full * block, k))
    rest = n - full * block
    if rest:
        tail = flat[full * k * block // 2 :]
        nb = block if not interleaved else rest
        blocks = -(-rest // nb)
        pieces = []
        for i in range(blocks):
            size = min(nb, rest - i * nb)
            b = tail[i * k * nb // 2 : i * k * nb // 2 + k * size // 2].view(k, size // 2)
            pieces.append(torch.stack([b & 15, b >> 4], dim=-1).reshape(k, size).T)
        parts.extend(pieces)
    return torch.cat(parts, dim=0)


def relayout_int4_weight(state: Int4WeightState) -> Int4WeightState:
    """``state`` re-packed for this process's layout (a no-op when it already matches).

    For a ``packed`` tensor saved on another machine together with its ``layout`` tag
    (e.g. AVX2's ``(32, True)`` read on AVX-512): the codes are unpacked with the saved
    layout and packed again by torch, bit-exact.
    """
    target = _layout()
    if tuple(state.layout) == target:
        return state
    n, kp = state.packed.shape[0], state.packed.shape[1] * 2
    nibbles = _unpack(state.packed, n, kp, tuple(state.layout)).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.contiguous(), 1)
    return dataclasses.replace(state, packed=packed, layout=target)


def unpack_int4_codes(state: Int4WeightState) -> torch.Tensor:
    """The codes ``[N, K]`` that ``prepare_int4_weight`` was given, bit-exact (uint8 or int8)."""
    n, k = state.packed.shape[0], state.packed.shape[1] * 2
    u = _unpack(state.packed, n, k, state.layout)[: state.out_features, : state.in_features]
    return (u.to(torch.int8) - 8) if state.signed else u.contiguous()


def dequantize_int4_weight(
    state: Int4WeightState, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float weight ``[N, K]`` the kernel multiplies by: ``(u - 8) * scale + zero``.

    It uses the bf16 ``scale``/``zero`` the kernel reads (math in float32), so it is the
    weight the fast path sees, within bf16 rounding of lowbit's float parameters.
    """
    w = _dequantize_padded(state)
    return w[: state.out_features, : state.in_features].to(dtype)


def _dequantize_padded(state: Int4WeightState) -> torch.Tensor:
    """The float32 weight ``[N_padded, K_padded]`` (zero rows/columns where padded)."""
    n, kp = state.packed.shape[0], state.packed.shape[1] * 2
    kg = state.kernel_group_size
    sz = state.scales_and_zeros.float().permute(1, 0, 2)  # [N, groups, 2]
    scale = sz[..., :1]
    shift = sz[..., 1:] - 8 * scale  # w = (u - 8) * scale + zero = u * scale + shift
    # in-place mul_/add_: a broadcasting torch.addcmul here is ~20x slower on the CPU
    u = _unpack(state.packed, n, kp, state.layout).view(n, kp // kg, kg).float()
    return u.mul_(scale).add_(shift).view(n, kp)


def int4_weight_linear(
    x: torch.Tensor,
    state: Int4WeightState,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """``x @ w.T + bias`` for ``x`` ``[..., K]``; returns ``x``'s dtype.

    impl: ``"fast"`` runs ``_weight_int4pack_mm_for_cpu`` on bf16 activations,
    ``"reference"`` runs float32 ``F.linear`` on ``dequantize_int4_weight(state)``,
    ``"auto"`` picks, for CPU tensors that need no gradient, the kernel below
    ``PREFILL_ROWS`` rows and the dequantized float GEMM from there on (``select_kernel``).
    """
    k, n = state.in_features, state.out_features
    if x.dim() == 0 or x.shape[-1] != k or not x.is_floating_point():
        check_input(x, k, FAMILY)
        raise KernelError(f"{FAMILY}: x must be floating point, got {x.dtype}; use x.float()")
    if bias is not None and bias.shape != (n,):
        check_bias(bias, n, FAMILY)
    if not use_fast(impl, x, FAMILY):
        w = dequantize_int4_weight(state).to(x.device)
        b = None if bias is None else bias.float()
        return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)
    flat = x.dim() != 2
    x2 = x.reshape(-1, k) if flat else x
    if impl == "auto" and x2.shape[0] >= PREFILL_ROWS:  # many rows: a float GEMM wins
        dtype = choices.float_dtype("prefill.int4_weight")
        w = (native.int4_dequant(state.packed, state.scales_and_zeros,
                                 state.kernel_group_size, tuple(state.layout), dtype)
             if dtype in (torch.float32, torch.bfloat16) and state.packed.is_contiguous()
             and native.available() else _dequantize_padded(state).to(dtype))
        # padded K above: pad x rather than copy a slice
        pad = w.shape[1] - k
        x2 = x2.to(dtype)
        y = torch.nn.functional.linear(torch.constant_pad_nd(x2, (0, pad)) if pad else x2, w)
        y = y[:, :n] if y.shape[1] != n else y
        y = y if bias is None else torch.add(y, bias)
        y = y.to(x.dtype)
        return y.view(*x.shape[:-1], n) if flat else y
    if state.layout[1] and native.preferred(FAMILY):  # few rows: lowbit's loop (autotune)
        y = native.int4_gemv(x2.float(), state.packed, state.scales_and_zeros,
                             state.kernel_group_size, state.layout[0], bias, n)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y.view(*x.shape[:-1], n) if flat else y
    x2 = x2.to(_BF16)
    pad = state.packed.shape[1] * 2 - k
    if pad:
        x2 = torch.constant_pad_nd(x2, (0, pad))
    elif not x2.is_contiguous():
        x2 = x2.contiguous()
    y = _INT4PACK_MM(x2, state.packed, state.kernel_group_size, state.scales_and_zeros)
    if state.packed.shape[0] != n:
        y = y[:, :n]
    if bias is not None:
        y = torch.add(y, bias)  # bf16 + fp32 bias promotes to fp32 in the same op
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    elif not y.is_contiguous():
        y = y.contiguous()
    return y.view(*x.shape[:-1], n) if flat else y


def select_kernel(x: torch.Tensor, impl: str = "auto") -> str:
    """The ``lowbit.kernels.KERNELS`` key that ``int4_weight_linear(x, ..., impl)`` runs."""
    name = choices.select_by_rows(x, impl, FAMILY, PREFILL_ROWS,
                                  (FAST, PREFILL, PREFILL_FP32, REFERENCE))
    return NATIVE if name == FAST and _layout()[1] and native.preferred(FAMILY) else name


def decode_callable(state: Int4WeightState, bias: torch.Tensor | None,
                    factors: tuple[torch.Tensor, ...] = ()):
    """``f(x) == int4_weight_linear(x @ H, state, bias)`` for float32 ``x`` with the native
    decode kernel's pointers bound once (``H`` as ``int8_weight.decode_callable``), or None
    where the native kernel does not run."""
    if not (state.layout[1] and native.preferred(FAMILY)):
        return None

    def fallback(x):
        return int4_weight_linear(rotate(x) if factors else x, state, bias)

    return native.int4_decoder(state.packed, state.scales_and_zeros, state.kernel_group_size,
                               state.layout[0], bias, state.out_features, state.in_features,
                               fallback, factors)


def merged_decode_callable(states: list[Int4WeightState], biases: list,
                           factors: tuple[torch.Tensor, ...] = ()):
    """As ``int8_weight.merged_decode_callable``: the packed row blocks and their (scale,
    zero) pairs concatenated along N, which needs every layer to fill whole blocks."""
    first = states[0]
    block, native_layout = first.layout
    if not (native_layout and native.preferred(FAMILY)):
        return None
    if any(s.layout != first.layout or s.packed.shape[1] != first.packed.shape[1]
           or s.kernel_group_size != first.kernel_group_size or s.n_padding
           or s.packed.shape[0] % block for s in states):
        return None
    sizes = [s.out_features for s in states]

    def fallback(x):
        x = rotate(x) if factors else x
        return torch.cat([int4_weight_linear(x, s, b) for s, b in zip(states, biases,
                                                                        strict=True)], -1)

    return native.int4_decoder(torch.cat([s.packed for s in states]),
                               torch.cat([s.scales_and_zeros for s in states], dim=1),
                               first.kernel_group_size, block, native.cat_bias(biases, sizes),
                               sum(sizes), first.in_features, fallback, factors)
