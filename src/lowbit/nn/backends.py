"""Backends: which kernel a ``QuantizedLinear`` runs, chosen once, explicitly, at build time.

Each backend turns canonical packed codes (``PackedWeight``) into the tensors its kernel
wants (``build``), runs the kernel (``forward``), and converts back for saving
(``to_packed``). The choice is printed in summaries (``QuantizedLinear.kernel``).

| backend | when | kernel |
|---|---|---|
| ``int8_weight`` | int8, per-channel, symmetric, weight-only | ``_weight_int8pack_mm`` (bf16 x) |
| ``int4_weight`` | integer <= 4 bits, per-group 32/64/128/256 | ``_weight_int4pack_mm_for_cpu`` |
| ``int8_dynamic`` | int8 per-channel weights, per-token int8 x | ``torch._int_mm`` |
| ``int8_static`` | int8 per-channel weights, calibrated int8 x | ``torch._int_mm`` |
| ``dequant`` | every other format | dequantize, then ``F.linear`` |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import IntFormat, QParams, compute_qparams, fake_quantize, get_format
from lowbit.formats.rotation import hadamard_factors
from lowbit.kernels import int4_weight as k4
from lowbit.kernels import int8_dynamic as k8a8
from lowbit.kernels import int8_weight as k8
from lowbit.kernels import weight_dequant
from lowbit.nn.activation import ActivationSpec, ModuleError
from lowbit.nn.codebook import CodebookBackend, is_row_codebook
from lowbit.nn.packed import PackedWeight, WeightSpec


class Backend:
    name = "abstract"
    family: str | None = None  # the lowbit.kernels family whose ``selected_kernel`` says more

    @property
    def kernel_name(self) -> str:
        """The kernel that runs, or ``"<decode kernel> | <prefill kernel>"`` when the choice
        depends on the number of rows (``lowbit.kernels.selected_kernel``, CPU-dependent)."""
        from lowbit.kernels import selected_kernel

        decode = selected_kernel(self.family, torch.zeros(1, 1))
        prefill = selected_kernel(self.family, torch.zeros(512, 1))
        return decode if decode == prefill else f"{decode} | {prefill}"

    def __init__(self, spec: WeightSpec, activation: ActivationSpec | None) -> None:
        self.spec = spec
        self.activation = activation

    def build(self, packed: PackedWeight, input_qparams: QParams | None):
        raise NotImplementedError

    def tensors(self, state) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def from_tensors(self, tensors: dict[str, torch.Tensor], old_state):
        raise NotImplementedError

    def to_packed(self, state) -> PackedWeight:
        raise NotImplementedError

    def forward(self, x, state, bias):
        raise NotImplementedError

    def decode_callable(self, state, bias, rotation: str | None = None):
        """A prebound ``f(x) == forward(rotate(x), state, bias)`` for float32 decode (no
        rotation when ``rotation`` is None), or None."""
        return None

    def merged_decode_callable(self, states: list, biases: list, rotation: str | None = None):
        """One prebound call for several layers of this backend that read the same input
        (rotated once by ``rotation`` when set), their outputs concatenated along the last
        dimension; or None."""
        return None

    def prefill_group_callable(self, states: list, biases: list, rotation: str | None = None):
        """``f(x) == [forward(rotate(x), s, b) for s, b in ...]`` for layers reading one
        input, sharing the work on it; None where the backend has no such call."""
        return None

    def simulate_input(self, x: torch.Tensor, state) -> torch.Tensor:
        """What the activations become before the matmul (reference path)."""
        if self.activation is None:
            return x
        if self.activation.mode == "dynamic":
            return fake_quantize(x, compute_qparams(x, "int8", "token"))
        return fake_quantize(x, state.input_qparams)


class DequantBackend(Backend):
    """Any format: keep the canonical packed codes, dequantize on every call."""

    name = "dequant"
    kernel_name = "dequant+F.linear"  # type: ignore[assignment]

    def build(self, packed, input_qparams):
        packed.input_qparams = input_qparams
        return packed

    def tensors(self, state):
        return {f"w_{k}": v for k, v in state.tensors().items()}

    def from_tensors(self, tensors, old_state):
        raw = {k.removeprefix("w_"): v for k, v in tensors.items()}
        new = PackedWeight.from_tensors(raw, self.spec, old_state.in_features)
        new.input_qparams = old_state.input_qparams
        return new

    def to_packed(self, state):
        return state

    def forward(self, x, state, bias):
        w = _widened(state, x.dtype if x.dtype != torch.float16 else torch.float32)
        x_in = self.simulate_input(x, state) if self.activation else x
        b = None if bias is None else bias.to(w.dtype)
        return F.linear(x_in.to(w.dtype), w, b).to(x.dtype)


class Int8WeightBackend(Backend):
    """int8 per-channel symmetric weight-only through ``_weight_int8pack_mm``."""

    name = "int8_weight"
    family = "int8_weight"

    def build(self, packed, input_qparams):
        scale = packed.qparams.scale.float().reshape(-1)
        return k8.prepare_int8_weight(packed.codes(), scale)

    def tensors(self, state):
        return {"w_qdata": state.qdata, "w_kernel_scale": state.kernel_scale,
                "w_scale": state.scale}

    def from_tensors(self, tensors, old_state):
        return k8.Int8WeightState(tensors["w_qdata"], tensors["w_kernel_scale"],
                                  tensors["w_scale"], old_state.in_features,
                                  old_state.out_features)

    def to_packed(self, state):
        codes = state.qdata[:, : state.in_features]
        qparams = QParams(get_format("int8"), self.spec.granularity,
                          state.scale.to(_scale_dtype(self.spec)), None, self.spec.scale_dtype)
        return PackedWeight.from_codes(codes, qparams)

    def forward(self, x, state, bias):
        return k8.int8_weight_linear(x, state, bias)

    def decode_callable(self, state, bias, rotation=None):
        return k8.decode_callable(state, bias, _factors(state.in_features, rotation))

    def merged_decode_callable(self, states, biases, rotation=None):
        return k8.merged_decode_callable(states, biases,
                                         _factors(states[0].in_features, rotation))


class Int4WeightBackend(Backend):
    """Integer codes of <= 4 bits, per-group, through ``_weight_int4pack_mm_for_cpu``.

    The kernel reads bf16 scales and zeros. With ``scale_dtype="bf16"`` (the presets) the
    kernel's scales are the exact scales and only the integer zero-point is kept beside them
    (1 byte per group); with a wider scale dtype the exact scales are kept too, so saving is
    always lossless."""

    name = "int4_weight"
    family = "int4_weight"

    def build(self, packed, input_qparams):
        qp = packed.qparams
        state = k4.prepare_int4_weight(
            packed.codes(), qp.scale.float(), None if qp.zero_point is None
            else qp.zero_point.float(), group_size=qp.granularity.group_size)
        return (state, qp)

    def _keeps_scale(self) -> bool:
        return self.spec.scale_dtype != "bf16"

    def tensors(self, state):
        kernel, qp = state
        out = {"w_packed": kernel.packed, "w_scales_and_zeros": kernel.scales_and_zeros}
        if self._keeps_scale():
            out["w_scale"] = qp.scale
        if qp.zero_point is not None:
            out["w_zero_point"] = qp.zero_point
        return out

    def from_tensors(self, tensors, old_state):
        from dataclasses import replace

        kernel, qp = old_state
        kernel = replace(kernel, packed=tensors["w_packed"],
                         scales_and_zeros=tensors["w_scales_and_zeros"])
        scale = tensors["w_scale"] if self._keeps_scale() else qp.scale
        return (kernel, replace(qp, scale=scale, zero_point=tensors.get("w_zero_point")))

    def to_packed(self, state):
        from dataclasses import replace

        kernel, qp = state
        codes = k4.unpack_int4_codes(kernel).to(qp.format.code_dtype)
        if not self._keeps_scale():  # the kernel's bf16 scales are the exact ones
            n_groups = qp.scale.shape[-1]
            first = torch.arange(n_groups) * kernel.group_size // kernel.kernel_group_size
            scale = kernel.scales_and_zeros[first, : kernel.out_features, 0].T.contiguous()
            qp = replace(qp, scale=scale)
        return PackedWeight.from_codes(codes, qp)

    def forward(self, x, state, bias):
        return k4.int4_weight_linear(x, state[0], bias)

    def decode_callable(self, state, bias, rotation=None):
        return k4.decode_callable(state[0], bias, _factors(state[0].in_features, rotation))

    def merged_decode_callable(self, states, biases, rotation=None):
        return k4.merged_decode_callable([s[0] for s in states], biases,
                                         _factors(states[0][0].in_features, rotation))


class Int8DynamicBackend(Backend):
    """Signed integer weights (<= 8 bits) per channel x per-token int8 activations on
    ``torch._int_mm``."""

    name = "int8_dynamic"
    family = "int8_dynamic"

    def build(self, packed, input_qparams):
        codes = packed.codes().to(torch.int8)
        return (k8a8.prepare_int8_dynamic(codes, packed.qparams.scale.float().reshape(-1)),
                packed.qparams, input_qparams)

    def tensors(self, state):
        return {"w_qdata": state[0].qdata, "w_scale": state[0].scale}

    def from_tensors(self, tensors, old_state):
        from dataclasses import replace

        kernel, qp, iq = old_state
        return (replace(kernel, qdata=tensors["w_qdata"], scale=tensors["w_scale"]), qp, iq)

    def to_packed(self, state):
        kernel, qp, _ = state
        codes = kernel.qdata.to(qp.format.code_dtype)
        return PackedWeight.from_codes(codes, qp)

    def simulate_input(self, x, state):
        if self.activation.mode == "static":
            return fake_quantize(x, state[2])
        return super().simulate_input(x, state)

    def forward(self, x, state, bias):
        return k8a8.int8_dynamic_linear(x, state[0], bias)

    def decode_callable(self, state, bias, rotation=None):
        return k8a8.decode_callable(state[0], bias, _factors(state[0].in_features, rotation))

    def prefill_group_callable(self, states, biases, rotation=None):
        return k8a8.group_prefill_callable([s[0] for s in states], biases,
                                           _factors(states[0][0].in_features, rotation))


class Int8StaticBackend(Int8DynamicBackend):
    """As ``Int8DynamicBackend`` with one calibrated activation scale per tensor."""

    name = "int8_static"
    family = "int8_static"

    def build(self, packed, input_qparams):
        if input_qparams is None:
            raise ModuleError("static activation quantization needs a calibrated input scale")
        codes = packed.codes().to(torch.int8)
        state = k8a8.prepare_int8_static(codes, packed.qparams.scale.float().reshape(-1),
                                         input_qparams.scale.float())
        return (state, packed.qparams, input_qparams)

    def from_tensors(self, tensors, old_state):
        from dataclasses import replace

        kernel, qp, iq = old_state
        return (replace(kernel, qdata=tensors["w_qdata"], scale=tensors["w_scale"],
                        out_scale=tensors["w_scale"] * kernel.act_scale), qp, iq)

    def forward(self, x, state, bias):
        return k8a8.int8_static_linear(x, state[0], bias)


def _scale_dtype(spec: WeightSpec) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.scale_dtype, torch.float32)


BACKENDS: dict[str, type[Backend]] = {
    "dequant": DequantBackend,
    "int8_weight": Int8WeightBackend,
    "int4_weight": Int4WeightBackend,
    "int8_dynamic": Int8DynamicBackend,
    "int8_static": Int8StaticBackend,
    "codebook": CodebookBackend,
}


def _candidates(spec: WeightSpec, activation: ActivationSpec | None) -> list[str]:
    fmt = get_format(spec.format)
    gran = spec.granularity
    per_channel = gran.kind == "channel" and gran.axis == 0
    if is_row_codebook(fmt):  # per-row k-means tables (nn.codebook)
        return ["codebook"]
    names = []
    if activation is not None:
        if not (isinstance(fmt, IntFormat) and fmt.signed and per_channel and spec.symmetric):
            raise ModuleError(
                "activation quantization runs int8 x int8 matmuls: use signed integer "
                "per-channel symmetric weights with it (e.g. recipe 'w8a8' or 'w4a8')"
            )
        names.append("int8_dynamic" if activation.mode == "dynamic" else "int8_static")
    elif fmt.name == "int8" and per_channel and spec.symmetric:
        names.append("int8_weight")
    elif isinstance(fmt, IntFormat) and fmt.bits <= 4 and gran.kind == "group":
        if gran.group_size % 32 == 0:
            names.append("int4_weight")
    names.append("dequant")
    return names


def select_backend(
    spec: WeightSpec,
    activation: ActivationSpec | None,
    packed: PackedWeight,
    requested: str | None = None,
) -> Backend:
    """The fastest backend that can run ``spec`` (or the one ``requested``)."""
    names = _candidates(spec, activation)
    if requested is not None:
        if requested not in BACKENDS:
            raise ModuleError(f"unknown backend {requested!r}; available: {sorted(BACKENDS)}")
        if requested not in names:
            raise ModuleError(f"backend {requested!r} cannot run {spec}; candidates: {names}")
        names = [requested]
    for name in names:
        if name in BACKENDS and (activation is None or name != "dequant"):
            return BACKENDS[name](spec, activation)
    return DequantBackend(spec, activation)


def _widened(state: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``state.dequantize(dtype)``, widened in C (``kernels.weight_dequant``) for a 4-bit
    lookup format (NF4, log4, codebook(values)) or symmetric int8 codes, with group or
    channel scales."""
    qp = state.qparams
    fmt, gran = qp.format, qp.granularity
    lookup = fmt.kind == "lookup" and fmt.bits == 4 and len(fmt.values) <= 16
    int8 = isinstance(fmt, IntFormat) and fmt.bits == 8 and fmt.signed
    n, k = state.qdata.shape[0], state.in_features
    group = gran.group_size if gran.kind == "group" else k
    if (not (lookup or int8) or qp.scale.numel() != n * -(-k // max(group, 1))
            or not weight_dequant.usable(gran.kind, qp.zero_point, dtype)):
        return state.dequantize(dtype)
    scales = qp.scale.reshape(n, -1)
    if int8:
        return weight_dequant.int8_weight(state.qdata.view(torch.int8), k, scales, group,
                                          dtype)
    table = F.pad(torch.tensor(fmt.values, dtype=torch.float32), (0, 16 - len(fmt.values)))
    return weight_dequant.lookup_weight(state.qdata, k, table, scales, group, dtype)


def _factors(k: int, rotation: str | None) -> tuple[torch.Tensor, ...]:
    """The Kronecker factors of the ``k``-wide input rotation (none without one)."""
    return () if rotation is None else hadamard_factors(k)
