"""What this CPU's instruction set offers, detected once on first use (never at import).

Which kernel wins depends on the instruction set, not only on the shapes. Measured with
torch 2.13 on 2 cores (benchmarks/kernel_speed.py):

| 512x576x1536 (prefill) | AVX-512 + BF16 + VNNI | AVX2 only (no BF16, no VNNI) |
|---|---|---|
| FP32 ``F.linear`` | 5.5 ms | 6.2 ms |
| BF16 ``F.linear`` | 1.4 ms | 52 ms |
| ``torch._int_mm`` int8 x int8 | 0.7 ms | 197 ms |

Flags alone do not settle it (one-row ``torch._int_mm`` is slow even with VNNI), so kernels
are chosen by measurement (``kernels.autotune``); these features are reported beside it.
``assume_cpu`` (tests) or ``LOWBIT_CPU=avx2`` / ``LOWBIT_CPU=avx512_bf16`` (a process) make
the choices follow the flags instead: bf16 GEMMs where bf16 is native, ``torch._int_mm``
where the CPU has VNNI, lowbit's C GEMVs where bf16 is emulated.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

__all__ = ["CpuFeatures", "assume_cpu", "cpu_features", "fast_float_dtype"]

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_PRESETS = {
    "avx2": dict(capability="AVX2", native_bf16=False, vnni=False),
    "avx512_bf16": dict(capability="AVX512", native_bf16=True, vnni=True),
}


@dataclass(frozen=True)
class CpuFeatures:
    """capability: torch's ATen dispatch level (``AVX2``, ``AVX512``, ...);
    native_bf16: oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX);
    vnni: int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), which
    ``torch._int_mm`` needs to be fast."""

    capability: str
    native_bf16: bool
    vnni: bool

    @property
    def float_dtype(self) -> torch.dtype:
        """The float dtype of the fastest large matmul here."""
        return torch.bfloat16 if self.native_bf16 else torch.float32

    def describe(self) -> str:
        return (f"{self.capability}, bf16 matmul {'native' if self.native_bf16 else 'emulated'}"
                f", int8 dot product {'VNNI' if self.vnni else 'none'}")


_override: CpuFeatures | None = None


@functools.cache
def _detect() -> CpuFeatures:
    preset = os.environ.get("LOWBIT_CPU", "").strip().lower()
    if preset:
        if preset not in _PRESETS:
            raise ValueError(f"LOWBIT_CPU={preset!r} is not one of {sorted(_PRESETS)}")
        return CpuFeatures(**_PRESETS[preset])
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = False
    return CpuFeatures(capability, native_bf16, _has_vnni())


def _has_vnni() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the instructions that make _int_mm fast are there
        return True
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return any(f in flags.split() for f in _VNNI_FLAGS)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cpu_line() -> str:
    """The CPU and what lowbit's kernels use on it, as every benchmark prints it."""
    return f"{cpu_name()}; {cpu_features().describe()}"


def cpu_features() -> CpuFeatures:
    """This machine's features (or what ``assume_cpu`` says)."""
    return _override if _override is not None else _detect()


def fast_float_dtype() -> torch.dtype:
    """bf16 where bf16 matmuls are native, else float32 (by flags; kernels use autotune)."""
    return cpu_features().float_dtype


@contextlib.contextmanager
def assume_cpu(**features):
    """Run the block as if the CPU had ``features`` (``native_bf16=``, ``vnni=``)."""
    global _override
    before = _override
    _override = replace(cpu_features(), **features)
    try:
        yield _override
    finally:
        _override = before
