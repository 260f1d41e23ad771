"""The small operations between a prefill's linears: torch's, or lowbit's C kernels.

``prefill_ops(runtime)`` picks them for one prefill. Where the runtime computes in float32
with a SiLU MLP and lowbit's native step is preferred here (``native_step_supported``), the
RMSNorms (with the residual add folded in), SiLU x up (``csrc/decode_ops.c``, rows split over
the threads) and the causal attention (``kernels.prefill_attention``, where ``autotune``
measured it faster) run in C on the float32 activations; everywhere else, and inside a
compiled prefill, torch's operations run, which are the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from lowbit.kernels import choices, native, prefill_attention

__all__ = ["NativeOps", "TorchOps", "prefill_ops"]


class TorchOps:
    """The reference: torch's operations in the runtime's dtype."""

    def __init__(self, act_fn: Callable, attend: Callable = prefill_attention.attend_torch):
        self.act_fn, self.attend = act_fn, attend

    def norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    def add_norm(self, x: torch.Tensor, d: torch.Tensor, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + d, rms_norm(x + d))``."""
        x = x + d
        return x, self.norm(x, w, eps)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up


class NativeOps(TorchOps):
    """The same operations in C on contiguous float32 tensors; ``add_norm`` updates ``x``
    (the runtime's own residual stream) in place."""

    def __init__(self, attend: Callable):
        super().__init__(F.silu, attend)
        lib = native.library()
        self._rms, self._add_rms, self._silu_mul = (
            lib.lowbit_rmsnorm, lib.lowbit_add_rmsnorm, lib.lowbit_silu_mul)

    def norm(self, x, w, eps):
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.shape[-1]
        self._rms(x.data_ptr(), x.numel() // n, n, w.data_ptr(), eps, out.data_ptr())
        return out

    def add_norm(self, x, d, w, eps):
        d = d.contiguous()
        out = torch.empty_like(x)
        n = x.shape[-1]
        self._add_rms(x.data_ptr(), d.data_ptr(), x.numel() // n, n, w.data_ptr(), eps,
                      out.data_ptr())
        return x, out

    def glu(self, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        self._silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel(), out.data_ptr())
        return out


def prefill_ops(runtime) -> TorchOps:
    """The operations one prefill of ``runtime`` runs (see the module docstring)."""
    spec = runtime.spec
    if runtime.compile_prefill or runtime._native_step is None:
        return TorchOps(spec.act_fn)
    native_attention = (prefill_attention.supported(spec.head_dim, spec.num_heads,
                                                    spec.num_kv_heads)
                        and choices.choice("prefill.attention") == "native")
    return NativeOps(prefill_attention.attend if native_attention
                     else prefill_attention.attend_torch)
