"""Fake-quant modules for quantization-aware training (QAT).

Forward passes see weights (and optionally activations) rounded onto a format's grid;
backward passes use straight-through estimators (STE; Bengio et al., 2013), so training
learns to absorb the rounding (Jacob et al., 2018, sec. 2.3; Krishnamoorthi, 2018).

Three ways to get a scale (``QuantizerSpec.learnable``):

- ``None``: weights take min/max (times a fixed clipping ratio) parameters from the
  current weight on every step, with the clipped STE of ``lowbit.formats.fake_quantize``;
  static activations take them from a ``lowbit.observers`` observer that sees the first
  ``freeze_after`` training batches and then freezes; dynamic activations compute
  per-token parameters on every call.
- ``"lsq"``: the scale is a parameter learned with the LSQ gradient (Esser et al., 2020,
  "Learned Step Size Quantization", eq. 3):
  ``d x_hat / d s = -x/s + round(x/s)`` inside the range, ``Q_N`` or ``Q_P`` outside,
  scaled by ``g = 1 / sqrt(N * Q_P)`` (sec. 2.2), ``N`` = elements sharing the scale.
- ``"lsq+"``: LSQ plus a learnable offset (Bhalgat et al., 2020, "LSQ+", eq. 4), written
  here as a learnable zero-point ``z`` rounded with an STE, so that after training the
  offset is the integer zero-point that packed storage holds (``beta = -s * round(z)``).

No gradient path (a clear ``FakeQuantError`` at construction): a learnable scale for MX
formats or ``e8m0`` scales (a power-of-two scale derived from the data has a zero
gradient almost everywhere), and a learnable offset for formats without a zero-point
(float, lookup, binary, ternary). The fused forward / backward lives in ``lowbit.nn.lsq``.
Static activations: ``N`` of the gradient scale is the features per example.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import (
    Granularity,
    QParams,
    compute_qparams,
    fake_quantize,
    get_format,
    minmax,
    qparams_from_range,
    quantize,
)
from lowbit.nn import lsq
from lowbit.nn.activation import ModuleError
from lowbit.observers import get_observer

LEARNABLE = (None, "lsq", "lsq+")
INITS = ("minmax", "mse", "lsq")


class FakeQuantError(ModuleError):
    """A fake-quant configuration with no gradient path or an invalid option."""


@dataclass(frozen=True)
class QuantizerSpec:
    """What one ``FakeQuantizer`` does (names as in ``WeightSpec`` / ``ActivationSpec``).

    ``dynamic``: per-call parameters (per-token activations); ``observer`` and
    ``freeze_after``: static activation ranges; ``init``: how a learnable weight scale
    starts (``minmax``, ``mse`` clipping search, or LSQ's ``2 mean|w| / sqrt(Q_P)``).
    """

    format: str = "int8"
    granularity: str = "channel"
    symmetric: bool = True
    scale_dtype: str = "fp32"
    learnable: str | None = None
    dynamic: bool = False
    observer: str = "minmax"
    freeze_after: int = 100
    init: str = "minmax"
    integer_zero_point: bool = True

    def __post_init__(self) -> None:
        check_gradient_path(self)

    def to_dict(self) -> dict:
        return asdict(self)


def check_gradient_path(spec: QuantizerSpec) -> None:
    """Raise ``FakeQuantError`` when ``spec`` asks for a gradient the format cannot give."""
    fmt = get_format(spec.format)
    Granularity.parse(spec.granularity)
    if spec.learnable not in LEARNABLE:
        raise FakeQuantError(f"learnable must be one of {LEARNABLE}, got {spec.learnable!r}")
    if spec.init not in INITS:
        raise FakeQuantError(f"init must be one of {INITS}, got {spec.init!r}")
    if spec.freeze_after < 1:
        raise FakeQuantError(f"freeze_after must be >= 1 step, got {spec.freeze_after}")
    if fmt.kind == "float" and fmt.bits == 16:
        raise FakeQuantError(f"{fmt.name} is a compute dtype, not a quantization grid: train "
                             f"with lowbit.training.MixedPrecision('{fmt.name}') instead")
    if spec.learnable is None:
        return
    if spec.dynamic:
        raise FakeQuantError("dynamic (per-token) parameters are recomputed on every call, so "
                             "they cannot be learned: use learnable=None for them")
    if fmt.kind == "mx" or spec.scale_dtype == "e8m0":
        raise FakeQuantError(
            f"{fmt.name} with {spec.scale_dtype} scales has no gradient path for a learnable "
            f"scale (a power-of-two scale derived from the data has zero gradient almost "
            f"everywhere): use learnable=None, or an integer/float format with fp32/bf16 scales")
    if spec.learnable == "lsq+" and not fmt.supports_zero_point:
        raise FakeQuantError(
            f"LSQ+ learns an offset, but {fmt.name} has no zero-point (no gradient path for "
            f"it): use learnable='lsq', or an integer format such as uint4 with "
            f"symmetric=False")
    if spec.learnable == "lsq+" and spec.symmetric:
        raise FakeQuantError("LSQ+ learns an offset: set symmetric=False (asymmetric range)")


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      spec: QuantizerSpec, g: float) -> torch.Tensor:
    """LSQ / LSQ+ fake quantization of ``x`` as ``spec`` says (see ``lowbit.nn.lsq``)."""
    return lsq.lsq_fake_quantize(x, scale, zero_point, get_format(spec.format),
                                 Granularity.parse(spec.granularity), spec.scale_dtype, g)


# -- the quantizer -----------------------------------------------------------------------
class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor (a weight when built with ``shape``, else activations)."""

    def __init__(self, spec: QuantizerSpec, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.fmt = get_format(spec.format)
        self.granularity = Granularity.parse(spec.granularity)
        self.is_weight = shape is not None
        self.weight_shape = None if shape is None else tuple(shape)
        pshape = self.granularity.param_shape(shape) if shape is not None else ()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # non-learnable weights: fixed per-parameter clipping ratio of the min/max range
        self.register_buffer("clip_ratio", torch.ones(pshape) if self.is_weight else None)
        # static activations: the observed (then frozen) range
        self.register_buffer("min_val", None if self.is_weight else torch.zeros(()))
        self.register_buffer("max_val", None if self.is_weight else torch.zeros(()))
        self.scale = nn.Parameter(torch.ones(pshape)) if spec.learnable else None
        if spec.learnable == "lsq+":
            self.zero_point = nn.Parameter(torch.zeros(pshape))
        else:  # LSQ on an asymmetric grid: the zero-point stays as initialised
            fixed = spec.learnable is not None and not spec.symmetric
            self.register_buffer("zero_point", torch.zeros(pshape) if fixed else None)
        self._observer = None

    @classmethod
    def for_weight(cls, spec: QuantizerSpec, weight: torch.Tensor) -> FakeQuantizer:
        """A weight quantizer whose clipping / learnable scale start from ``weight``."""
        q = cls(spec, tuple(weight.shape))
        q.init_from(weight.detach().float())
        return q

    # -- facts -------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return int(self.step) >= self.spec.freeze_after

    def extra_repr(self) -> str:
        s = self.spec
        what = "weight" if self.is_weight else ("dynamic" if s.dynamic else "static")
        return (f"{what}, format={s.format}, granularity={s.granularity}, "
                f"symmetric={s.symmetric}, learnable={s.learnable}")

    def lsq_g(self, x: torch.Tensor) -> float:
        """LSQ gradient scale ``1 / sqrt(N * Q_P)`` (Esser et al., 2020, sec. 2.2)."""
        n = x.numel() / max(1, self.scale.numel()) if self.is_weight else x[0].numel()
        return 1.0 / math.sqrt(max(1.0, n) * max(1.0, self.fmt.max_value))

    # -- initialisation ----------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Weights: clipping ratio (``init='mse'``) and learnable scale / offset from ``w``."""
        spec, gran = self.spec, self.granularity
        if spec.init == "mse":
            obs = get_observer("mse", self.fmt, gran, symmetric=spec.symmetric,
                               scale_dtype=spec.scale_dtype, num_candidates=40,
                               min_ratio=0.2, bins=512)
            obs.update(w)
            obs.compute_range()
            self.clip_ratio.copy_(obs.best_ratio.float().reshape(self.clip_ratio.shape))
        if self.scale is None:
            return
        if spec.init == "lsq":  # 2 <|w|> / sqrt(Q_P), Esser et al. (2020), sec. 2.1
            mean_abs = gran.rows(w.abs()).sum(1) / max(1, w.numel() // max(1, self.scale.numel()))
            scale = 2 * mean_abs.reshape(self.scale.shape) / math.sqrt(self.fmt.max_value)
            self.scale.copy_(scale.clamp_min(1e-8))
            return
        qp = self._range_qparams(w)
        self.load_qparams(qp)

    @torch.no_grad()
    def load_qparams(self, qp: QParams) -> None:
        """Start the learnable scale (and offset) from ``qp``."""
        self.scale.copy_(qp.scale.float().reshape(self.scale.shape))
        if self.zero_point is not None and qp.zero_point is not None:
            self.zero_point.copy_(qp.zero_point.float().reshape(self.zero_point.shape))

    def _range_qparams(self, w: torch.Tensor) -> QParams:
        lo, hi = minmax(w, self.granularity)
        ratio = self.clip_ratio.to(lo.device)
        return qparams_from_range(lo * ratio, hi * ratio, self.fmt, self.granularity,
                                  symmetric=self.spec.symmetric,
                                  scale_dtype=self.spec.scale_dtype,
                                  integer_zero_point=self.spec.integer_zero_point)

    # -- parameters as packed storage holds them ---------------------------------------
    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        """The ``QParams`` the forward pass uses (``x``: the weight, for weights)."""
        spec = self.spec
        if self.scale is not None and (self.is_weight or self.frozen):
            scale = self.scale.detach().float().clamp_min(1e-12)
            scale = scale.to(lsq.HALF_DTYPES.get(spec.scale_dtype, torch.float32))
            zp = None
            if self.zero_point is not None:
                zp = self.fmt.round(self.zero_point.detach().float())
                zp = zp.clamp(self.fmt.min_value, self.fmt.max_value).to(self.fmt.code_dtype)
            return QParams(self.fmt, self.granularity, scale, zp, spec.scale_dtype)
        if self.is_weight:
            if x is None:
                raise FakeQuantError("weight parameters depend on the weight: pass it")
            return self._range_qparams(x.detach().float())
        return self._observed_qparams()

    def _observed_qparams(self) -> QParams:
        if int(self.step) == 0:
            raise FakeQuantError(
                "this activation quantizer has observed no data: run a few training (or "
                "calibration) batches in model.train() mode before eval or convert()")
        return qparams_from_range(self.min_val, self.max_val, self.fmt, self.granularity,
                                  symmetric=self.spec.symmetric,
                                  scale_dtype=self.spec.scale_dtype)

    def quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """Codes and parameters of ``w`` exactly as the forward pass rounds it."""
        qp = self.qparams(w)
        return quantize(w.detach().float(), qp), qp

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.dynamic:
            qp = compute_qparams(x.detach().float(), self.fmt, self.granularity,
                                 symmetric=spec.symmetric, scale_dtype=spec.scale_dtype)
            return fake_quantize(x, qp)
        if not self.is_weight and self.training and not self.frozen:
            self._observe(x)
        if self.scale is not None and (self.is_weight or self.frozen):
            return lsq_fake_quantize(x, self.scale, self.zero_point, spec, self.lsq_g(x))
        return lsq.fixed_fake_quantize(x, self.qparams(x))

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        if self._observer is None:
            self._observer = get_observer(self.spec.observer, self.fmt, self.granularity,
                                          symmetric=self.spec.symmetric,
                                          scale_dtype=self.spec.scale_dtype)
            if int(self.step) > 0:  # resumed: seed the observer with the saved range
                self._observer.update(torch.stack([self.min_val, self.max_val]))
        self._observer.update(x.detach().float())
        lo, hi = self._observer.compute_range()
        self.min_val.copy_(lo.reshape(())), self.max_val.copy_(hi.reshape(()))
        self.step += 1
        if self.frozen:
            self._observer = None
            if self.scale is not None:
                self.load_qparams(self._observed_qparams())


# -- modules -----------------------------------------------------------------------------
class _FakeQuantMixin:
    """Shared by ``FakeQuantLinear`` and ``FakeQuantConv2d``: quantizers and LoRA."""

    def _setup(self, weight_spec: QuantizerSpec, activation_spec: QuantizerSpec | None,
               lora_rank: int, lora_alpha: float | None) -> None:
        w2d = self.weight.detach().float().reshape(self.weight.shape[0], -1)
        self.weight_quantizer = FakeQuantizer.for_weight(weight_spec, w2d)
        self.input_quantizer = None if activation_spec is None else FakeQuantizer(activation_spec)
        self.lora_rank = int(lora_rank)
        self.lora_a = self.lora_b = None
        if lora_rank:
            # LoRA (Hu et al., 2021): W + (alpha / r) B A, merged *before* fake quantization
            # so that convert() packs exactly what training saw
            out_f, in_f = w2d.shape
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(lora_rank, in_f, generator=gen) / math.sqrt(in_f)
            self.lora_a = nn.Parameter(a.to(self.weight.dtype))
            self.lora_b = nn.Parameter(torch.zeros(out_f, lora_rank, dtype=self.weight.dtype))
            self.lora_scaling = float(lora_alpha or lora_rank) / lora_rank

    def effective_weight(self) -> torch.Tensor:
        """The 2-D float weight before quantization (LoRA merged in)."""
        w = self.weight.reshape(self.weight.shape[0], -1)
        if self.lora_a is not None:
            w = w + self.lora_scaling * (self.lora_b @ self.lora_a)
        return w

    def fake_quant_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.effective_weight()).reshape(self.weight.shape)

    def quantized_weight(self) -> tuple[torch.Tensor, QParams]:
        """2-D codes ``[out, in * kh * kw]`` and parameters, as the forward pass rounds."""
        return self.weight_quantizer.quantize_weight(self.effective_weight().detach())

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` whose forward sees fake-quantized weights (and inputs)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_spec: QuantizerSpec, activation_spec: QuantizerSpec | None = None,
                 lora_rank: int = 0, lora_alpha: float | None = None, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(weight_spec, activation_spec, lora_rank, lora_alpha)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: QuantizerSpec,
                    activation_spec: QuantizerSpec | None = None, **kwargs) -> FakeQuantLinear:
        """Wraps ``linear``'s own parameters (shared, so tied weights stay tied)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        m._setup(weight_spec, activation_spec, kwargs.get("lora_rank", 0),
                 kwargs.get("lora_alpha"))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quant_weight()
        return F.linear(self._input(x), w.to(x.dtype), None if self.bias is None
                        else self.bias.to(x.dtype))


class FakeQuantConv2d(_FakeQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights; the weight is quantized as its 2-D view
    ``[out_channels, in_channels / groups * kh * kw]`` (per-channel = per output channel)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight_spec: QuantizerSpec,
                  activation_spec: QuantizerSpec | None = None, **kwargs) -> FakeQuantConv2d:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                    "dilation", "transposed", "output_padding", "groups", "padding_mode",
                    "_reversed_padding_repeated_twice"):
            setattr(m, key, getattr(conv, key))
        m.weight, m.bias = conv.weight, conv.bias
        m._setup(weight_spec, activation_spec, kwargs.get("lora_rank", 0),
                 kwargs.get("lora_alpha"))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quant_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(self._input(x), w, b)
