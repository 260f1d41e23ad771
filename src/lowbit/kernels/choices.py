"""The per-call lookup of ``autotune``'s choices, below everything that consults it.

The wrappers (``int8_weight`` ...), ``native.preferred`` and ``select_by_rows`` ask on every
call which candidate runs; ``autotune`` answers by measuring, which runs those wrappers
(``probe``). So the lookup lives here and imports only ``cpu`` and ``_common``: the
decisions, ``forcing``, the CPU-flag policy, and the measured ranking, read through the
source ``autotune`` registers when it is imported (``register_measured``), so that nothing
on the per-call path imports the measurement. ``autotune`` re-exports all of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable

import torch

from lowbit.kernels import cpu
from lowbit.kernels._common import KernelError, use_fast

DECISIONS: dict[str, tuple[str, ...]] = {
    "decode.int8_weight": ("native", "int8pack_mm"),
    "decode.int4_weight": ("native", "int4pack_mm"),
    "decode.w8a8": ("native", "int_mm", "fp32_gemm"),
    "prefill.int8_weight": ("bf16", "fp32"),
    "prefill.int4_weight": ("bf16", "fp32"),
    "prefill.w8a8": ("int_mm", "fp32_gemm"),
    "prefill.attention": ("native", "sdpa"),
    "runtime.int8_weight": ("fp32", "bf16"),
    "runtime.int4_weight": ("fp32", "bf16"),
    "runtime.w8a8": ("fp32", "bf16"),
    "runtime.float": ("fp32", "bf16"),
    "compute": ("fp32", "bf16"),
}
_forced: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lowbit_kernel_choices",
                                                                      default=None)
_measured: Callable[[], dict] | None = None


def register_measured(measured: Callable[[], dict]) -> None:
    """``autotune`` hands in ``measured`` (this machine's entry, measured or read back on
    first use); until then, which only a bare import of this module sees, choices follow
    the CPU flags."""
    global _measured
    _measured = measured


@contextlib.contextmanager
def forcing(choices: dict[str, str]):
    """Fix some decisions inside the block (this thread / context only)."""
    for name, value in choices.items():
        if value not in DECISIONS.get(name, ()):
            raise KernelError(f"unknown kernel choice {name}={value!r}; decisions and "
                              f"candidates: {DECISIONS}")
    token = _forced.set({**(_forced.get() or {}), **choices})
    try:
        yield
    finally:
        _forced.reset(token)


def by_flags() -> bool:
    """True where choices follow CPU flags (``assume_cpu`` or ``LOWBIT_CPU``), not timings."""
    return cpu._override is not None or bool(os.environ.get("LOWBIT_CPU", "").strip())


def flag_ranking(name: str) -> list[str]:
    """The old flag-based policy, as a ranking (best first)."""
    f = cpu.cpu_features()
    if name in ("decode.int8_weight", "decode.int4_weight"):
        torch_kernel = DECISIONS[name][1]
        return [torch_kernel, "native"] if f.native_bf16 else ["native", torch_kernel]
    if name == "decode.w8a8":
        return ["int_mm", "native", "fp32_gemm"] if f.vnni else ["native", "fp32_gemm", "int_mm"]
    if name == "prefill.attention":
        return ["native", "sdpa"]
    if name == "prefill.w8a8":
        return ["int_mm", "fp32_gemm"] if f.vnni else ["fp32_gemm", "int_mm"]
    return ["bf16", "fp32"] if f.native_bf16 else ["fp32", "bf16"]


def ranking(name: str) -> list[str]:
    """``name``'s candidates here, fastest first."""
    if by_flags() or _measured is None:
        return flag_ranking(name)
    return _measured()["ranking"][name]


def choice(name: str, skip: tuple[str, ...] = ()) -> str:
    """The candidate that runs for decision ``name`` (the best one not in ``skip``)."""
    fixed = _forced.get()
    value = None if fixed is None else fixed.get(name)
    if value is not None and value not in skip:
        return value
    for candidate in ranking(name):
        if candidate not in skip:
            return candidate
    return DECISIONS[name][-1]


def native_preferred(family: str | None) -> bool:
    """``native.preferred``'s answer where nothing forces it and the library is available."""
    if family is None:  # the fused float32 decode step: whenever the runtime is float32
        return not (by_flags() and cpu.cpu_features().native_bf16)
    return choice(f"decode.{family}") == "native"


def float_dtype(name: str) -> torch.dtype:
    """The dtype of a ``bf16`` / ``fp32`` decision."""
    return torch.bfloat16 if choice(name) == "bf16" else torch.float32


def select_by_rows(x: torch.Tensor, impl: str, family: str, prefill_rows: int,
                   kernels: tuple[str, str, str, str]) -> str:
    """The kernel a weight-only wrapper runs: ``kernels`` = (fast, prefill in bf16, prefill
    in fp32, reference); from ``prefill_rows`` rows on ``auto`` runs the float GEMM that
    ``autotune`` chose for ``prefill.<family>``."""
    fast, prefill_bf16, prefill_fp32, reference = kernels
    if not use_fast(impl, x, family):
        return reference
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    if impl == "auto" and rows >= prefill_rows:
        bf16 = choice(f"prefill.{family}") == "bf16"
        return prefill_bf16 if bf16 else prefill_fp32
    return fast
