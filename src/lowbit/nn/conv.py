"""``QuantizedConv2d``: a Conv2d layer whose weight really is stored in a few bits.

The weight ``[out_channels, in_channels / groups, kh, kw]`` is quantized as its 2-D view
``[out_channels, K]`` with ``K = in_channels / groups * kh * kw`` (im2col order), so every
granularity of ``lowbit.formats`` applies: ``channel`` is one scale per output channel,
``group:N`` groups along ``K``. The codes are held in lowbit's canonical packed layout
(``nn.packed.PackedWeight``), registered as buffers, so parameter + buffer bytes show the
real size.

Two paths, compared by the tests:

- fast (``impl="auto"``): dequantize once per call to the input's dtype, then
  ``F.conv2d`` (oneDNN). There is no integer convolution kernel for arbitrary bit widths
  on the CPU; the dequantized weight lives only for the duration of the call.
- reference (``impl="reference"``): dequantize to float32 and compute the convolution as an
  explicit im2col matrix product (``F.unfold`` + matmul), group by group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from lowbit.formats import QParams, compute_qparams, quantize
from lowbit.nn.activation import ModuleError
from lowbit.nn.packed import PackedWeight, WeightSpec

KERNEL = "dequant+F.conv2d"


class QuantizedConv2d(nn.Module):
    def __init__(self, packed: PackedWeight, spec: WeightSpec, bias: torch.Tensor | None,
                 *, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        k = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        if packed.out_features != out_channels or packed.in_features != k:
            raise ModuleError(
                f"packed weight is {packed.out_features}x{packed.in_features}, a conv with "
                f"{out_channels} outputs, {in_channels} inputs, groups={groups} and kernel "
                f"{self.kernel_size} needs {out_channels}x{k}")
        self.spec = spec
        self._install(packed)
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, qparams: QParams, spec: WeightSpec,
                   bias: torch.Tensor | None = None, **conv_args) -> QuantizedConv2d:
        """``codes``: ``[out, K]`` (or the 4-D weight shape, flattened here)."""
        codes = codes.reshape(codes.shape[0], -1)
        return cls(PackedWeight.from_codes(codes, qparams), spec, bias, **conv_args)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: WeightSpec) -> QuantizedConv2d:
        """Round-to-nearest quantization of ``conv`` with min/max parameters."""
        w = conv.weight.detach().float().reshape(conv.out_channels, -1)
        qp = compute_qparams(w, spec.format, spec.granularity, symmetric=spec.symmetric,
                             scale_dtype=spec.scale_dtype)
        return cls.from_codes(quantize(w, qp), qp, spec, conv.bias, **conv_args_of(conv))

    def _install(self, packed: PackedWeight) -> None:
        self._packed = packed
        for name, tensor in packed.tensors().items():
            self.register_buffer(name, tensor)

    def _apply(self, fn, recurse=True):
        # codes and scales keep the dtypes of their format; only the device follows fn
        dtypes = {n: t.dtype for n, t in self._packed.tensors().items()}
        super()._apply(fn, recurse)
        tensors = {n: self._buffers[n].to(dtypes[n]) for n in dtypes}
        self._install(PackedWeight.from_tensors(tensors, self.spec, self._packed.in_features))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        tensors = {n: self._buffers[n] for n in ("qdata", "scale", "zero_point")
                   if self._buffers.get(n) is not None}
        self._install(PackedWeight.from_tensors(tensors, self.spec, self._packed.in_features))

    # -- facts -------------------------------------------------------------------------
    @property
    def kernel(self) -> str:
        return KERNEL

    def packed_weight(self) -> PackedWeight:
        return self._packed

    def conv_args(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    def manifest_entry(self) -> dict:
        """What ``lowbit.save`` needs to rebuild this module (JSON-serializable)."""
        return {"kind": "conv2d", **{k: list(v) if isinstance(v, tuple) else v
                                     for k, v in self.conv_args().items()},
                "bias": self.bias is not None, "weight": self.spec.to_dict(),
                "kernel": KERNEL}

    @classmethod
    def from_manifest(cls, entry: dict, tensors: dict[str, torch.Tensor]) -> QuantizedConv2d:
        """Inverse of ``manifest_entry`` with the module's own tensors (``qdata``, ``scale``,
        optional ``zero_point`` and ``bias``)."""
        spec = WeightSpec(**entry["weight"])
        args = {k: entry[k] for k in ("in_channels", "out_channels", "kernel_size", "stride",
                                      "padding", "dilation", "groups")}
        kh, kw = _pair(args["kernel_size"])
        k = args["in_channels"] // args["groups"] * kh * kw
        packed = PackedWeight.from_tensors(tensors, spec, k)
        return cls(packed, spec, tensors.get("bias"), **args)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The 4-D float weight the codes stand for."""
        w = self._packed.dequantize(dtype)
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def weight_nbytes(self) -> int:
        """Bytes of codes + scales + zero-points held in memory."""
        return sum(t.numel() * t.element_size() for t in self._packed.tensors().values())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"format={self.spec.format}, granularity={self.spec.granularity}, "
                f"kernel={KERNEL}")

    # -- compute -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        if impl == "reference":
            return self.reference_forward(x)
        dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        w = self.dequantize_weight(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        out = F.conv2d(x.to(dtype), w, b, self.stride, self.padding, self.dilation, self.groups)
        return out.to(x.dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """im2col: ``out[n, o, l] = sum_k W2d[o, k] * cols[n, k, l] + bias[o]`` in float32."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ModuleError(f"input must be [N, {self.in_channels}, H, W], got "
                              f"{tuple(x.shape)}")
        padding = self._explicit_padding()
        xf = x.float()
        n, _, h, w_in = xf.shape
        kh, kw = self.kernel_size
        out_h = (h + 2 * padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (w_in + 2 * padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        w2d = self._packed.dequantize(torch.float32)
        cin, cout = self.in_channels // self.groups, self.out_channels // self.groups
        outs = []
        for g in range(self.groups):
            cols = F.unfold(xf[:, g * cin:(g + 1) * cin], self.kernel_size,
                            dilation=self.dilation, padding=padding, stride=self.stride)
            outs.append(w2d[g * cout:(g + 1) * cout] @ cols)
        out = torch.cat(outs, dim=1)
        if self.bias is not None:
            out = out + self.bias[None, :, None]
        return out.reshape(n, self.out_channels, out_h, out_w).to(x.dtype)

    def _explicit_padding(self) -> tuple[int, int]:
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            if any(d * (k - 1) % 2 for d, k in zip(self.dilation, self.kernel_size,
                                                  strict=True)):
                raise ModuleError("the reference path supports 'same' padding only for odd "
                                  "effective kernel sizes; pass explicit padding")
            return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size,
                                                          strict=True))
        return self.padding


def conv_args_of(conv: nn.Conv2d) -> dict:
    """The geometry of ``conv`` as ``QuantizedConv2d`` keyword arguments."""
    if conv.padding_mode != "zeros":
        raise ModuleError(f"QuantizedConv2d supports padding_mode='zeros' only, got "
                          f"{conv.padding_mode!r}: keep this layer unquantized")
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
            "dilation": conv.dilation, "groups": conv.groups}
