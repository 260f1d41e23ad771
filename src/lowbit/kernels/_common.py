"""Helpers shared by the kernel wrappers: the error type, ``impl`` resolution, shape checks.

Kept tiny on purpose: every helper here runs on the per-call path of a decode step.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

IMPLS = ("auto", "fast", "reference")


class KernelError(LowbitError, ValueError):
    """A tensor or option that a lowbit kernel cannot accept (the message says the fix)."""


def use_fast(impl: str, x: torch.Tensor, family: str) -> bool:
    """Resolve ``impl`` for one call: True runs the torch CPU kernel, False the reference.

    ``auto`` takes the kernel for CPU tensors that need no gradient (the aten kernels have
    no autograd formula) and the reference otherwise; ``fast`` insists on the kernel.
    """
    if impl == "auto":
        return x.is_cpu and not (x.requires_grad and torch.is_grad_enabled())
    if impl == "fast":
        if not x.is_cpu:
            raise KernelError(
                f"{family}: impl='fast' runs a torch CPU kernel but x is on {x.device}; "
                f"move x to the CPU or use impl='reference'"
            )
        return True
    if impl == "reference":
        return False
    raise KernelError(f"{family}: unknown impl {impl!r}; use one of {IMPLS}")


def check_input(x: torch.Tensor, in_features: int, family: str) -> None:
    """Raise a clear error when ``x`` cannot feed a linear layer with ``in_features``."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise KernelError(
            f"{family}: x has shape {tuple(x.shape)} but the layer takes {in_features} input "
            f"features in the last dimension; reshape x to (..., {in_features})"
        )


def check_float(x: torch.Tensor, family: str) -> None:
    if not x.is_floating_point():
        raise KernelError(
            f"{family}: x must be a floating-point tensor (float32, bfloat16 or float16), "
            f"got {x.dtype}; convert it with x.float()"
        )


def check_weight(qdata: torch.Tensor, dtype: torch.dtype, family: str) -> tuple[int, int]:
    """Check a 2-D ``[out_features, in_features]`` code tensor; return ``(N, K)``."""
    if qdata.dim() != 2:
        raise KernelError(
            f"{family}: weight codes must be 2-D [out_features, in_features], got shape "
            f"{tuple(qdata.shape)}"
        )
    if qdata.dtype != dtype:
        raise KernelError(
            f"{family}: weight codes must be {dtype}, got {qdata.dtype}; convert with "
            f".to({dtype})"
        )
    n, k = qdata.shape
    if n == 0 or k == 0:
        raise KernelError(f"{family}: weight codes are empty (shape {tuple(qdata.shape)})")
    return n, k


def check_vector(t: torch.Tensor, n: int, what: str, family: str) -> torch.Tensor:
    """Return ``t`` as a 1-D float32 tensor of length ``n`` (accepts ``[n]`` or ``[n, 1]``)."""
    if t.numel() != n or t.dim() > 2 or (t.dim() == 2 and t.shape[1] != 1):
        raise KernelError(
            f"{family}: {what} must have shape [{n}] (one per output channel), got "
            f"{tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise KernelError(f"{family}: {what} must be floating point, got {t.dtype}")
    return t.reshape(n).float()


def check_bias(bias: torch.Tensor | None, n: int, family: str) -> None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise KernelError(
            f"{family}: bias must have shape [{n}], got {tuple(bias.shape)}"
        )


def aligned_contiguous(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``t`` itself when contiguous and ``alignment``-byte aligned, else an aligned copy.

    Some torch CPU kernels use aligned SIMD loads (``_weight_int8pack_mm`` reads its bf16
    activations with ``_mm256_load_si256``) and crash on a view that starts mid-vector.
    Fresh torch CPU allocations are 64-byte aligned.
    """
    if t.is_contiguous() and t.data_ptr() % alignment == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)

