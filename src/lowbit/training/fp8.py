"""FP8 training emulation: E4M3 forward, E5M2 gradients, delayed per-tensor scaling.

The FP8 training recipe of Micikevicius et al., 2022 ("FP8 Formats for Deep Learning",
sec. 3-4) as NVIDIA Transformer Engine implements it:

- inputs and weights of a linear are cast to E4M3 (max 448) for the forward matmul;
  output gradients to E5M2 (max 57344, wider range) for the two backward matmuls;
- each tensor gets a per-tensor scale ``s = fmax / (amax * 2^margin)`` so that its largest
  magnitude lands near the top of the format; values are cast as ``q = fp8(x * s)`` and
  the product is divided by the scales again;
- delayed scaling: ``amax`` is the maximum over a history of the last ``history_len``
  steps' amaxes (the current step's amax is recorded after it is used), which needs no
  extra pass over the tensor; the first step, with an empty history, uses its own amax.

On the CPU every cast is emulated: values are rounded to the FP8 grid (``torch.float8_*``
casts, round to nearest even, saturating) and the matmuls run in FP32 on those exact
values, which is what a tensor core with FP32 accumulation computes. On a GPU with FP8
tensor cores (compute capability >= 8.9) the forward matmul runs as
``torch._scaled_mm`` (guarded; not exercised by the CPU tests). Master weights, biases and
optimizer state stay FP32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FMAX = {E4M3: 448.0, E5M2: 57344.0}
# rows of the amax history: input, weight, output gradient
INPUT, WEIGHT, GRAD = 0, 1, 2


def fp8_scale(amax: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """``fmax / (amax * 2^margin)``; 1 where ``amax`` is 0 (nothing to scale)."""
    amax = amax.float()
    scale = FMAX[dtype] / (amax * 2.0**margin)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def cast_to_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values of ``x`` after ``fp8(x * scale) / scale`` (saturating), in float32."""
    fmax = FMAX[dtype]
    y = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return y.float() / scale


def has_fp8_matmul(device: torch.device) -> bool:
    """True on CUDA devices with FP8 tensor cores (Ada / Hopper and later)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class _Fp8LinearFn(torch.autograd.Function):
    """``y = fp8_e4m3(x) fp8_e4m3(w)^T + b``; ``dx, dw`` from ``fp8_e5m2(dy)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        sx = module.scale_for(INPUT, x)
        sw = module.scale_for(WEIGHT, weight)
        x2 = x.reshape(-1, x.shape[-1])
        if has_fp8_matmul(x.device):  # pragma: no cover - needs an FP8 GPU
            out = _scaled_mm_forward(x2, weight, sx, sw)
            xq, wq = cast_to_fp8(x2, sx, E4M3), cast_to_fp8(weight, sw, E4M3)
        else:
            xq, wq = cast_to_fp8(x2, sx, E4M3), cast_to_fp8(weight, sw, E4M3)
            out = xq @ wq.t()
        if bias is not None:
            out = out + bias.float()
        ctx.save_for_backward(xq, wq)
        ctx.module, ctx.has_bias, ctx.x_shape = module, bias is not None, x.shape
        ctx.dtypes = (x.dtype, weight.dtype)
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gq = cast_to_fp8(g2, ctx.module.scale_for(GRAD, g2), E5M2)
        grad_x = (gq @ wq).reshape(ctx.x_shape).to(ctx.dtypes[0])
        grad_w = (gq.t() @ xq).to(ctx.dtypes[1])
        grad_b = g2.float().sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def _scaled_mm_forward(x2, weight, sx, sw):  # pragma: no cover - needs an FP8 GPU
    fmax = FMAX[E4M3]
    xf = (x2.float() * sx).clamp(-fmax, fmax).to(E4M3)
    wf = (weight.float() * sw).clamp(-fmax, fmax).to(E4M3)
    one = torch.ones((), device=x2.device)
    return torch._scaled_mm(xf, wf.t(), scale_a=one / sx, scale_b=one / sw,
                            out_dtype=torch.float32)


class Fp8Linear(nn.Linear):
    """``nn.Linear`` trained with emulated FP8 matmuls and delayed scaling."""

    def __init__(self, *args, history_len: int = 16, margin: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fp8(history_len, margin)

    def _init_fp8(self, history_len: int, margin: int) -> None:
        self.margin = int(margin)
        # one row per tensor (input, weight, grad), newest amax in column 0
        self.register_buffer("amax_history", torch.zeros(3, int(history_len)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, history_len: int = 16, margin: int = 0
                    ) -> Fp8Linear:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        m._init_fp8(history_len, margin)
        return m

    @torch.no_grad()
    def scale_for(self, row: int, t: torch.Tensor) -> torch.Tensor:
        """Delayed scale from the history, then record ``t``'s amax (Micikevicius et al.,
        2022, sec. 4.3)."""
        dtype = E5M2 if row == GRAD else E4M3
        hist = self.amax_history[row]
        amax_now = t.detach().abs().max().float()
        amax = hist.max() if hist.max() > 0 else amax_now
        if self.training:
            self.amax_history[row] = torch.roll(hist, 1)
            self.amax_history[row, 0] = amax_now
        return fp8_scale(amax.to(t.device), dtype, self.margin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not self.training:
            # inference: the same FP8 rounding, without recording history
            sx, sw = self.scale_for(INPUT, x), self.scale_for(WEIGHT, self.weight)
            y = F.linear(cast_to_fp8(x, sx, E4M3), cast_to_fp8(self.weight, sw, E4M3),
                         None if self.bias is None else self.bias.float())
            return y.to(x.dtype)
        return _Fp8LinearFn.apply(x, self.weight, self.bias, self)


def to_fp8_training(model: nn.Module, skip: tuple[str, ...] = (), history_len: int = 16,
                    margin: int = 0) -> nn.Module:
    """Swap every ``nn.Linear`` (except names in ``skip``) for ``Fp8Linear`` in place;
    parameters are shared, so optimizers built before still see them."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name not in skip:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Fp8Linear.from_linear(module, history_len, margin))
    return model
