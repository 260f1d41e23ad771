"""Fused straight-through fake quantization with learned step sizes (LSQ / LSQ+).

``(round(clip(x/s + z)) - z) * s`` as one autograd function whose backward pass is the
closed form of the papers' gradients instead of autograd's chain of saved intermediates
(about half the memory passes on a weight, which dominate QAT of small LLMs on a CPU):

- ``d/dx``: 1 inside the representable range, 0 where ``x`` clipped (the clipped STE of
  Bengio et al., 2013, as in Jacob et al., 2018);
- ``d/ds``: ``round(x/s + z) - z - x/s`` inside, ``Q_N - z`` or ``Q_P - z`` outside
  (Esser et al., 2020, "Learned Step Size Quantization", eq. 3), scaled by the LSQ gradient
  scale ``g = 1 / sqrt(N * Q_P)`` (sec. 2.2) through ``grad_scale``;
- ``d/dz``: 0 inside, ``-s`` outside: LSQ+'s offset gradient (Bhalgat et al., 2020) written
  for an integer zero-point ``z`` (``beta = -s * round(z)``), rounded with an STE.

Grouped parameters broadcast against a view of ``x`` (no copy) when the groups divide the
last axis; ragged groups fall back to ``Granularity.expand``.
"""

from __future__ import annotations

import torch

from lowbit.formats import Granularity, IntFormat, NumberFormat, QParams

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient times ``g`` in the backward pass (LSQ, fig. 2)."""
    return (x - x * g).detach() + x * g


def round_ste(y: torch.Tensor, fmt) -> torch.Tensor:
    """``y`` rounded onto ``fmt``'s grid, with an identity gradient."""
    return y + (fmt.round(y.detach()) - y).detach()


def rounded_scale(s: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """The scale as stored (fp16/bf16 rounding), with an identity gradient."""
    s = s.clamp_min(1e-12)
    if scale_dtype in HALF_DTYPES:
        return s + (s.detach().to(HALF_DTYPES[scale_dtype]).float() - s).detach()
    return s


class _LSQ(torch.autograd.Function):
    """Fused ``(round(clip(x/s + z)) - z) * s`` with the LSQ / LSQ+ gradients (``s``, ``z``
    broadcast against ``x``): ``dx = 1`` inside the range (STE), ``ds = q - z - x/s`` inside
    and ``q - z`` outside (Esser et al., 2020, eq. 3), ``dz = -s`` outside, 0 inside. One
    pass per step instead of autograd's chain of saved intermediates."""

    @staticmethod
    def forward(ctx, x, s, z, fmt):
        qmin, qmax = fmt.min_value, fmt.max_value
        y = x / s if z is None else x / s + z
        yc = y.clamp(qmin, qmax)
        q = torch.round(yc) if isinstance(fmt, IntFormat) else fmt.round(yc)
        qz = q if z is None else q - z
        ctx.save_for_backward(x, s, z, qz)
        ctx.bounds = (qmin, qmax)
        return qz * s

    @staticmethod
    def backward(ctx, grad):
        x, s, z, qz = ctx.saved_tensors
        fmt_min, fmt_max = ctx.bounds
        y = x / s if z is None else x / s + z
        inside = (y >= fmt_min) & (y <= fmt_max)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            grad_s = (grad * torch.where(inside, qz - x / s, qz)).sum_to_size(s.shape)
        if z is not None and ctx.needs_input_grad[2]:
            grad_z = (grad * torch.where(inside, 0.0, -s)).sum_to_size(z.shape)
        return grad_x, grad_s, grad_z, None


def broadcastable(param: torch.Tensor, x: torch.Tensor, gran: Granularity):
    """``x`` viewed so that ``param`` broadcasts against it without a copy, the matching view
    of ``param``, and the shape to restore (groups of a ragged last group are expanded)."""
    if gran.kind == "group" and x.dim() and x.shape[-1] % gran.group_size == 0:
        xv = x.reshape(*x.shape[:-1], -1, gran.group_size)
        return xv, param.unsqueeze(-1)
    return x, gran.expand(param, x.shape)


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      fmt: NumberFormat, granularity: Granularity, scale_dtype: str,
                      g: float) -> torch.Tensor:
    """LSQ / LSQ+ fake quantization of ``x`` with learnable ``scale`` (and ``zero_point``);
    ``grad_scale`` by ``g`` and the scale dtype's rounding act on the small parameters."""
    s = rounded_scale(grad_scale(scale, g), scale_dtype)
    z = None
    if zero_point is not None:
        z = round_ste(grad_scale(zero_point, g), fmt).clamp(fmt.min_value, fmt.max_value)
    xv, sv = broadcastable(s, x.float(), granularity)
    zv = None if z is None else broadcastable(z, x.float(), granularity)[1]
    return _LSQ.apply(xv, sv, zv, fmt).reshape(x.shape).to(x.dtype)


def fixed_fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``lowbit.formats.fake_quantize`` (clipped STE) for fixed parameters, fused."""
    s = qp.scale.detach().float()
    z = None if qp.zero_point is None else qp.zero_point.detach().float()
    xv, sv = broadcastable(s, x.float(), qp.granularity)
    zv = None if z is None else broadcastable(z, x.float(), qp.granularity)[1]
    return _LSQ.apply(xv, sv, zv, qp.format).reshape(x.shape).to(x.dtype)
