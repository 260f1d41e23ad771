"""lowbit's own AVX2 decode kernels (``csrc/gemv_avx2.c``, ``csrc/decode_ops.c``) and GPTQ's
column loops (``csrc/solve_ops.c``, bound in ``native_solve``), compiled on first use.

Why: where bf16 is emulated (AVX2 only) torch's weight-only kernels ``_weight_int8pack_mm``
and ``_weight_int4pack_mm_for_cpu`` run slow bf16 code, and even with native bf16 a
one-row ``torch._int_mm`` is slow. Decode reads each weight once per token, so a loop that
widens int8 (or int4) codes in registers and accumulates in float32 is bound by memory
bandwidth instead (``benchmarks/kernel_speed.py`` measures both, side by side).

Two libraries are built with the system's C compiler (``$CC``, else cc/gcc/clang) into
``~/.cache/lowbit/native/`` (or ``$LOWBIT_CACHE/native``) the first time they are asked for
(about a second), under a temporary name renamed when complete, and loaded with ``ctypes``:
the GEMVs and fused decode operations with ``-mavx2 -mfma``, and the solvers' plain-C column
loops with portable flags (so GPTQ's fast loops run on CPUs without AVX2 too). OpenMP
resolves to the ``libgomp`` torch has already loaded, so ``torch.set_num_threads`` applies.

``available()`` is False, with ``why_unavailable()`` saying why, when the CPU lacks AVX2/FMA,
no compiler is found, the build fails, or ``LOWBIT_NATIVE=0``; a missing compiler or a failed
build also warns once (``NativeUnavailableWarning``). Where it is False the wrappers run
torch's kernels. Whether few-row calls run these kernels where they are available is
measured once per machine (``kernels.autotune``); ``LOWBIT_NATIVE=1`` or ``force`` override.

The float32 weights these kernels multiply by are exactly those of the reference paths
(``dequantize_int8_weight``, ``dequantize_int4_weight``); ``tests/kernels`` compare them.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
import warnings
from pathlib import Path

import torch

from lowbit.kernels import choices, native_build
from lowbit.kernels.native_build import (  # noqa: F401  (re-exported)
    _SOLVE_STEM,
    _STEM,
    FLAGS,
    HEADERS,
    SOLVE_FLAGS,
    SOLVE_SOURCES,
    SOURCES,
    NativeUnavailableWarning,
    _build,
    _load,
    build_failure,
    cache_root,
    library_tag,
)

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_failure: str | None = None
#: the decode callables hand this many rows and more back to the prefill path
MAX_ROWS = 32


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return " avx2" in flags and " fma" in flags


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _failure
    setting = os.environ.get("LOWBIT_NATIVE", "").strip()
    if setting == "0":
        _failure = "disabled by LOWBIT_NATIVE=0"
        return None
    if not _cpu_has_avx2_fma():
        _failure = "the CPU lacks AVX2/FMA"
        warnings.warn("lowbit's native kernels need AVX2 and FMA, which this CPU lacks: "
                      "the reference (torch) paths run instead", NativeUnavailableWarning,
                      stacklevel=3)
        return None
    try:
        lib = _load(SOURCES, FLAGS, _STEM, HEADERS)
    except RuntimeError as exc:
        _failure = str(exc)
        return None
    lib.lowbit_int8_gemv.argtypes = [_P, _I, _I, _P, _I, _P, _P, _P, _I]
    lib.lowbit_int8_gemv.restype = None
    lib.lowbit_int4_gemv.argtypes = [_P, _I, _I, _P, _I, _I, _I, _P, _I, _P, _P, _I, _P]
    lib.lowbit_int4_gemv.restype = None
    lib.lowbit_w8a8_gemv.argtypes = [_P, _I, _I, _P, _I, _P, _P, _P, _I, _F, _I, _P, _P, _P]
    lib.lowbit_w8a8_gemv.restype = None
    lib.lowbit_rot_int8_gemv.argtypes = [_P, _I, _I, _P, _I, _P, _P, _P, _I, _I, _P, _P, _P]
    lib.lowbit_rot_int8_gemv.restype = None
    lib.lowbit_rot_int4_gemv.argtypes = [_P, _I, _I, _P, _I, _I, _I, _P, _I, _P, _P, _I, _P,
                                         _I, _P, _P, _P]
    lib.lowbit_rot_int4_gemv.restype = None
    for name, args in (("lowbit_int4_dequant", [_P, _I, _I, _I, _I, _P, _I, _I, _P]),
                       ("lowbit_rmsnorm", [_P, _I, _I, _P, _F, _P]),
                       ("lowbit_add_rmsnorm", [_P, _P, _I, _I, _P, _F, _P]),
                       ("lowbit_silu_mul", [_P, _P, _I, _P]),
                       ("lowbit_w8a8_quantize_rows", [_P, _I, _I, _I, _P, _P, _F, _P, _P]),
                       ("lowbit_w8a8_dequant", [_P, _I, _I, _P, _P]),
                       ("lowbit_attend", [_P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P,
                                          _F, _P, _P])):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    lib.lowbit_w8a8_quantize_rows.restype = ctypes.c_int
    return lib


@functools.cache
def solve_library() -> ctypes.CDLL | None:
    """The solvers' column loops (``csrc/solve_ops.c``, portable flags), or None where
    ``LOWBIT_NATIVE=0`` or the build fails (``why_unavailable(solve=True)`` says why)."""
    global _solve_failure
    if os.environ.get("LOWBIT_NATIVE", "").strip() == "0":
        _solve_failure = "disabled by LOWBIT_NATIVE=0"
        return None
    try:
        return _load(SOLVE_SOURCES, SOLVE_FLAGS, _SOLVE_STEM, ())
    except RuntimeError as exc:
        _solve_failure = str(exc)
        return None


_solve_failure: str | None = None


def library() -> ctypes.CDLL:
    """The loaded library (call only where ``available()``): ``runtime.native_step`` binds
    the fused decode operations of ``csrc/decode_ops.c`` from it."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"lowbit's native kernels are unavailable: {_failure}")
    return lib


def available() -> bool:
    """True when the native decode kernels are built and loadable here."""
    return _library() is not None


def why_unavailable(solve: bool = False) -> str | None:
    """Why the decode library (or with ``solve`` the solvers') is unavailable, or None."""
    if solve:
        solve_library()
        return _solve_failure
    _library()
    return _failure


def reset() -> None:
    """Forget the loaded libraries, failures and settings of this process (tests: change
    ``CC`` / ``LOWBIT_CACHE`` / ``LOWBIT_NATIVE``, then call this)."""
    global _failure, _solve_failure
    _failure = _solve_failure = native_build._build_failure = None
    for cached in (_library, solve_library, _setting):
        cached.cache_clear()


_forced: contextvars.ContextVar[bool | None] = contextvars.ContextVar("lowbit_native_forced",
                                                                     default=None)


@contextlib.contextmanager
def force(enabled: bool):
    """Run the native kernels (``True``) or torch's (``False``) for few-row calls inside the
    block, whatever the CPU: benchmarks time both side by side, tests cover both. Scoped to
    the current thread / context and restored exactly on exit."""
    token = _forced.set(bool(enabled))
    try:
        yield
    finally:
        _forced.reset(token)


def forced() -> bool | None:
    """``force``'s setting in this context, or None."""
    return _forced.get()


@functools.cache
def _setting() -> str:
    return os.environ.get("LOWBIT_NATIVE", "").strip()


def preferred(family: str | None = None) -> bool:
    """Whether few-row (decode) calls of ``family`` (``int8_weight``, ``int4_weight``,
    ``w8a8``; None: the fused decode step) run the native kernels: ``force`` first, then
    ``LOWBIT_NATIVE`` (``0`` / ``1``), then ``kernels.autotune``'s choice for this machine
    (measured, or by CPU flags under ``assume_cpu`` / ``LOWBIT_CPU``)."""
    f = _forced.get()
    if f is not None:
        return f and available()
    setting = _setting()
    if setting in ("0", "1"):
        return setting == "1" and available()
    if not available():
        return False
    return choices.native_preferred(family)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def int8_gemv(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor | None,
              bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """``x @ (qdata[:, :K] * scale).T + bias`` for float32 ``x`` ``[M, K]``; float32 out.

    ``qdata`` int8 ``[N, ldq]`` contiguous (``ldq >= K``), ``scale`` float32 ``[N]`` (None: the
    bare sums, e.g. of W8A8's integer codes).
    """
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    bias = None if bias is None else bias.float().contiguous()
    _library().lowbit_int8_gemv(x.data_ptr(), m, k, qdata.data_ptr(), qdata.shape[1],
                                _ptr(scale), _ptr(bias), y.data_ptr(), n)
    return y


def w8a8_quantize_rows(x: torch.Tensor, rotation: tuple, act_scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8's int8 codes ``[M, K]`` and float32 scales ``[M, 1]`` of float32 ``x`` ``[M, K]``
    rotated by ``rotation`` (``factor_args`` of the Kronecker factors; of ``()``: as is),
    per token (``act_scale`` 0) or with the static ``act_scale`` (``csrc/w8a8_prefill.c``)."""
    x = x.contiguous()
    m, k = x.shape
    nf, sizes, flat = rotation
    codes = torch.empty(m, k, dtype=torch.int8)
    scales = torch.empty(m, 1, dtype=torch.float32)
    if _library().lowbit_w8a8_quantize_rows(x.data_ptr(), m, k, nf, sizes.data_ptr(),
                                            flat.data_ptr(), float(act_scale),
                                            codes.data_ptr(), scales.data_ptr()):
        raise MemoryError("w8a8_quantize_rows: no memory for the rotation buffers")
    return codes, scales


def w8a8_dequant(acc: torch.Tensor, x_scale: torch.Tensor | None,
                 w_scale: torch.Tensor) -> torch.Tensor:
    """``torch.mul(acc, x_scale).mul_(w_scale)`` (``x_scale`` None: ``acc * w_scale``) for
    int32 ``acc`` ``[M, N]``, written over ``acc``'s memory as float32 (returned)."""
    m, n = acc.shape
    _library().lowbit_w8a8_dequant(acc.data_ptr(), m, n, _ptr(x_scale), w_scale.data_ptr())
    return acc.view(torch.float32)


def _scratch_floats(rows: int, kp: int, kernel_group: int) -> int:
    """Scratch of ``lowbit_int4_gemv``: int16 activations, group sums, one scale per row."""
    return rows * (kp // 2 + kp // kernel_group + 1)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
              kernel_group: int, block: int, bias: torch.Tensor | None,
              n: int) -> torch.Tensor:
    """``x @ w.T + bias`` with ``w`` in torch's int4 CPU layout (``int4_weight``)."""
    x = x.contiguous()
    m, k = x.shape
    np_, kp = packed.shape[0], packed.shape[1] * 2
    y = torch.empty(m, n, dtype=torch.float32)
    scratch = torch.empty(_scratch_floats(m, kp, kernel_group), dtype=torch.float32)
    bias = None if bias is None else bias.float().contiguous()
    _library().lowbit_int4_gemv(x.data_ptr(), m, k, packed.data_ptr(), np_, kp, block,
                                scales_and_zeros.data_ptr(), kernel_group, _ptr(bias),
                                y.data_ptr(), n, scratch.data_ptr())
    return y


def int4_dequant(packed: torch.Tensor, scales_and_zeros: torch.Tensor, kernel_group: int,
                 layout: tuple[int, bool], dtype: torch.dtype) -> torch.Tensor:
    """The float32 or bfloat16 weight ``[N_padded, K_padded]`` of torch's int4 CPU layout
    (``int4_weight._dequantize_padded``'s numbers, then ``.to(dtype)``)."""
    np_, kp = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(np_, kp, dtype=dtype)
    _library().lowbit_int4_dequant(packed.data_ptr(), np_, kp, layout[0], int(layout[1]),
                                   scales_and_zeros.data_ptr(), kernel_group,
                                   int(dtype == torch.bfloat16), out.data_ptr())
    return out


def _bound(call, k: int, n: int, fallback, before: tuple, after: tuple, keep: tuple):
    """``f(x)`` = ``call(x, m, k, *before, y, n, *after)`` for float32 ``x`` ``[..., k]`` with
    fewer than ``MAX_ROWS`` rows, else ``fallback(x)``; ``keep`` holds the tensors whose
    pointers are bound, so they stay valid while ``f`` lives."""

    def f(x: torch.Tensor, _keep=keep) -> torch.Tensor:
        m = x.numel() // k
        if m >= MAX_ROWS or x.dtype is not torch.float32:
            return fallback(x)
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], n)
        call(x.data_ptr(), m, k, *before, y.data_ptr(), n, *after)
        return y

    return f


def int8_decoder(qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, n: int,
                 k: int, fallback, factors: tuple[torch.Tensor, ...] = ()):
    """``int8_gemv`` with every weight pointer bound once, for a decode loop: ``f(x)`` for
    float32 ``x`` ``[..., k]``, handing ``MAX_ROWS`` rows and more to ``fallback``. With
    ``factors`` the input is first rotated by their Kronecker product in the same call
    (``lowbit_rot_int8_gemv``: a layer that rotates its input)."""
    bias = None if bias is None else bias.float().contiguous()
    before = (qdata.data_ptr(), qdata.shape[1], scale.data_ptr(), _ptr(bias))
    after, keep = _rotation_args(k, factors)
    call = _library().lowbit_rot_int8_gemv if factors else _library().lowbit_int8_gemv
    return _bound(call, k, n, fallback, before, after, (qdata, scale, bias, *keep))


def w8a8_decoder(qdata: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None,
                 n: int, k: int, act_scale: float, factors: tuple[torch.Tensor, ...],
                 fallback):
    """W8A8 in one call: rotate the input by the Kronecker product of ``factors`` (none: no
    rotation), quantize it per token (``act_scale`` 0) or with ``act_scale`` (static), run
    the int8 loop on the codes and scale by ``wscale`` (``s_w``, or ``act_scale * s_w`` when
    static). Bound as ``int8_decoder``."""
    bias = None if bias is None else bias.float().contiguous()
    nf, sizes, flat = factor_args(factors)
    scratch = torch.empty(2 * MAX_ROWS * k, dtype=torch.float32)
    before = (qdata.data_ptr(), qdata.shape[1], wscale.data_ptr(), _ptr(bias))
    after = (float(act_scale), nf, sizes.data_ptr(), flat.data_ptr(),
             scratch.data_ptr())
    return _bound(_library().lowbit_w8a8_gemv, k, n, fallback, before, after,
                  (qdata, wscale, bias, sizes, flat, scratch))


def factor_args(factors: tuple[torch.Tensor, ...]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The number of factors, their sizes (int64) and their row-major entries back to back
    (float32), as ``kron_rotate`` reads them (no factors: 0 and a placeholder each). A
    normalized Sylvester factor is passed as ``-size`` with no entries (C applies it by
    Walsh-Hadamard butterflies), neighbouring ones merged (``H_a ⊗ H_b = H_ab``)."""
    from lowbit.formats.rotation import is_sylvester

    factors = list(factors)
    inner = [1] * len(factors)  # entries after each factor's axis
    for a in range(len(factors) - 2, -1, -1):
        inner[a] = inner[a + 1] * factors[a + 1].shape[0]
    for a, f in enumerate(factors):
        # a dense factor whose axis has 3, 5, 6 or 7 entries after it would run a short
        # strided loop: multiply it out with the factors after it (2 and 4 have their own
        # vector path: 576 = 12 x 12 x 4 stays three factors)
        if not is_sylvester(f) and 1 < inner[a] < 8 and inner[a] not in (2, 4):
            merged = factors[a].double()
            for g in factors[a + 1:]:
                merged = torch.kron(merged, g.double())
            factors = factors[:a] + [merged.float()]
            break
    sizes: list[int] = []
    dense: list[torch.Tensor] = []
    for f in factors:
        s = f.shape[0]
        if is_sylvester(f):
            if sizes and sizes[-1] < 0:
                sizes[-1] *= s
            else:
                sizes.append(-s)
        else:
            sizes.append(s)
            dense.append(f.float().reshape(-1))
    flat = torch.cat(dense) if dense else torch.zeros(1)
    return len(sizes), torch.tensor(sizes or [0], dtype=torch.int64), flat


def int4_decoder(packed: torch.Tensor, scales_and_zeros: torch.Tensor, kernel_group: int,
                 block: int, bias: torch.Tensor | None, n: int, k: int, fallback,
                 factors: tuple[torch.Tensor, ...] = ()):
    """``int4_gemv`` with every weight pointer bound once (see ``int8_decoder``)."""
    bias = None if bias is None else bias.float().contiguous()
    np_, kp = packed.shape[0], packed.shape[1] * 2
    scratch = torch.empty(_scratch_floats(MAX_ROWS, kp, kernel_group), dtype=torch.float32)
    before = (packed.data_ptr(), np_, kp, block, scales_and_zeros.data_ptr(), kernel_group,
              _ptr(bias))
    after, keep = _rotation_args(k, factors)
    call = _library().lowbit_rot_int4_gemv if factors else _library().lowbit_int4_gemv
    return _bound(call, k, n, fallback, before, (scratch.data_ptr(), *after),
                  (packed, scales_and_zeros, bias, scratch, *keep))


def _rotation_args(k: int, factors: tuple[torch.Tensor, ...]) -> tuple[tuple, tuple]:
    """The trailing arguments of ``lowbit_rot_*_gemv`` (none without ``factors``): the
    factors as ``kron_rotate`` reads them and the rotated input's buffer; and the tensors
    behind those pointers."""
    if not factors:
        return (), ()
    nf, sizes, flat = factor_args(factors)
    rx = torch.empty(MAX_ROWS * k + k, dtype=torch.float32)
    return (nf, sizes.data_ptr(), flat.data_ptr(), rx.data_ptr()), (sizes, flat, rx)


def cat_bias(biases: list, sizes: list[int]) -> torch.Tensor | None:
    """The biases of layers whose outputs are concatenated (zeros for a layer without)."""
    if all(b is None for b in biases):
        return None
    return torch.cat([torch.zeros(n) if b is None else b.detach().float()
                      for b, n in zip(biases, sizes, strict=True)])
