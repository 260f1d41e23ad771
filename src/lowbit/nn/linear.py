"""``QuantizedLinear``: a Linear layer whose weight really is stored in a few bits.

In memory the module holds the tensors of its backend (the kernel's own layout, registered
as buffers so parameter + buffer bytes show the real size). Its ``state_dict`` holds
lowbit's canonical packed codes (``nn.packed``), converted on the fly, so a saved file
does not depend on any kernel's layout. ``forward(x, impl="reference")`` runs the plain
path (dequantize, then a float32 matmul) that tests compare the fast path against.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats import QParams, rotate
from lowbit.nn.activation import ActivationSpec, ModuleError
from lowbit.nn.backends import Backend, select_backend
from lowbit.nn.packed import PackedWeight, WeightSpec


class QuantizedLinear(nn.Module):
    def __init__(
        self,
        packed: PackedWeight,
        spec: WeightSpec,
        bias: torch.Tensor | None = None,
        *,
        activation: ActivationSpec | None = None,
        input_qparams: QParams | None = None,
        backend: str | None = None,
        outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """``outliers``: ``(input channel indices, their float weight columns [N, k])`` kept
        in higher precision beside the quantized weight (LLM.int8(), Dettmers et al., 2022,
        eq. 5: the outlier columns' product is added in floating point)."""
        super().__init__()
        if spec.rotation is not None and outliers is not None:
            raise ModuleError("outlier channels and an input rotation do not combine: the "
                              "rotation already spreads outliers; use one of them")
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.spec = spec
        self.activation = activation
        self.input_qparams = input_qparams
        self.backend: Backend = select_backend(spec, activation, packed, backend)
        self._install(self.backend.build(packed, input_qparams))
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None
        self._set_outliers(outliers)

    def _set_outliers(self, outliers) -> None:
        if outliers is None:
            self.outlier_index = self.outlier_weight = None
            return
        index, weight = outliers
        self.register_buffer("outlier_index", index.detach().to(torch.int64).clone())
        self.register_buffer("outlier_weight", weight.detach().to(torch.bfloat16).clone())

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        qparams: QParams,
        spec: WeightSpec,
        bias: torch.Tensor | None = None,
        **kwargs,
    ) -> QuantizedLinear:
        return cls(PackedWeight.from_codes(codes, qparams), spec, bias, **kwargs)

    def _install(self, state) -> None:
        self._state = state
        self._dtypes = {}
        for name, tensor in self.backend.tensors(state).items():
            self._dtypes[name] = tensor.dtype
            if name in self._buffers:
                self._buffers[name] = tensor
            else:
                self.register_buffer(name, tensor, persistent=False)

    def _apply(self, fn, recurse=True):
        # moves follow ``fn``; the dtypes of codes and scales are part of the format
        super()._apply(fn, recurse)
        tensors = {}
        for name, dtype in self._dtypes.items():
            t = self._buffers[name]
            tensors[name] = t if t.dtype == dtype else t.to(dtype)
        self._install(self.backend.from_tensors(tensors, self._state))
        return self

    # -- facts -------------------------------------------------------------------------
    @property
    def kernel(self) -> str:
        """Name of the kernel that runs in ``forward`` (``lowbit.kernels.KERNELS``)."""
        return self.backend.kernel_name

    def packed_weight(self) -> PackedWeight:
        return self.backend.to_packed(self._state)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer applies to its (unrotated) input: ``Q(W H) H^T`` when it
        rotates its input, else the dequantized codes."""
        w = self.packed_weight().dequantize(torch.float32)
        if self.spec.rotation is not None:
            w = rotate(w.double(), self.spec.rotation, inverse=True).float()
        return w.to(dtype)

    def weight_nbytes(self) -> int:
        """Bytes of codes + scales + zero-points (+ outlier columns) held in memory."""
        tensors = list(self.backend.tensors(self._state).values())
        if self.outlier_index is not None:
            tensors += [self.outlier_index, self.outlier_weight]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        act = f", activation={self.activation.mode}" if self.activation else ""
        rot = f", rotation={self.spec.rotation}" if self.spec.rotation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.spec.format}, granularity={self.spec.granularity}, "
                f"symmetric={self.spec.symmetric}{act}{rot}, kernel={self.kernel}")

    # -- compute -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        if impl == "reference":
            return self.reference_forward(x)
        if self.spec.rotation is not None:
            x = rotate(x, self.spec.rotation)
        if self.outlier_index is None:
            return self.backend.forward(x, self._state, self.bias)
        idx = self.outlier_index
        y = self.backend.forward(x.index_fill(-1, idx, 0), self._state, self.bias)
        return y + torch.nn.functional.linear(x.index_select(-1, idx),
                                              self.outlier_weight.to(x.dtype))

    def decode_callable(self, dtype: torch.dtype):
        """``f(x) == self(x)`` for ``dtype`` activations with the kernel's arguments bound
        once (a decode loop's fast path), or None when the layer has no such path (outlier
        columns, a rotated input its kernel does not fuse, or no native kernel for its
        format here)."""
        if self.outlier_index is not None or dtype is not torch.float32:
            return None
        return self.backend.decode_callable(self._state, self.bias, self.spec.rotation)

    @staticmethod
    def merged_decode_callable(layers: list, dtype: torch.dtype):
        """One prebound call computing ``torch.cat([layer(x) for layer in layers], -1)`` for
        ``dtype`` activations (layers that read the same input: q/k/v, gate/up), or None
        unless they are all ``QuantizedLinear`` on one backend type whose native kernel can
        concatenate them (one rotation or none for all, no outlier columns)."""
        if dtype is not torch.float32 or not all(type(m) is QuantizedLinear for m in layers):
            return None
        kind, rotation = type(layers[0].backend), layers[0].spec.rotation
        if any(type(m.backend) is not kind or m.spec.rotation != rotation
               or m.outlier_index is not None for m in layers):
            return None
        return layers[0].backend.merged_decode_callable([m._state for m in layers],
                                                        [m.bias for m in layers], rotation)

    @staticmethod
    def prefill_group_callable(layers: list):
        """``f(x) == [layer(x) for layer in layers]`` for many-row inputs read by every layer
        (q/k/v, gate/up, or one layer) from the backend, sharing work on the input (W8A8:
        its rotation and codes once), or None unless they are all ``QuantizedLinear`` on one
        backend type that has such a call, with one rotation or none and no outlier
        columns."""
        if not all(type(m) is QuantizedLinear for m in layers):
            return None
        kind, rotation = type(layers[0].backend), layers[0].spec.rotation
        if any(type(m.backend) is not kind or m.spec.rotation != rotation
               or m.outlier_index is not None for m in layers):
            return None
        group = getattr(layers[0].backend, "prefill_group_callable", None)  # not every
        if group is None:  # backend derives from Backend (the codebook one does not)
            return None
        return group([m._state for m in layers], [m.bias for m in layers], rotation)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain path: simulate activation quantization, dequantize, float32 matmul."""
        if x.shape[-1] != self.in_features:
            raise ModuleError(f"input has {x.shape[-1]} features, layer takes {self.in_features}")
        xf = x.float()
        if self.spec.rotation is not None:
            xf = rotate(xf.double(), self.spec.rotation).float()
        extra = 0
        if self.outlier_index is not None:
            extra = torch.nn.functional.linear(xf[..., self.outlier_index],
                                               self.outlier_weight.float())
            xf = xf.index_fill(-1, self.outlier_index, 0)
        xf = self.backend.simulate_input(xf, self._state)
        w = self.packed_weight().dequantize(torch.float32)  # in the rotated basis, if any
        return (torch.nn.functional.linear(xf, w, self.bias) + extra).to(x.dtype)

    # -- state dict: canonical packed codes --------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        packed = self.packed_weight()
        for name, tensor in packed.tensors().items():
            destination[prefix + name] = tensor
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias
        if self.outlier_index is not None:
            destination[prefix + "outlier_index"] = self.outlier_index
            destination[prefix + "outlier_weight"] = self.outlier_weight
        if self.input_qparams is not None:
            destination[prefix + "input_scale"] = self.input_qparams.scale
            if self.input_qparams.zero_point is not None:
                destination[prefix + "input_zero_point"] = self.input_qparams.zero_point

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = ["qdata", "scale", "zero_point", "bias", "input_scale", "input_zero_point",
                 "outlier_index", "outlier_weight"]
        found = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        for n in ("qdata", "scale"):
            if n not in found:
                missing_keys.append(prefix + n)
        if "qdata" not in found or "scale" not in found:
            return
        packed = PackedWeight.from_tensors(found, self.spec, self.in_features)
        if self.input_qparams is not None and "input_scale" in found:
            self.input_qparams = QParams(self.input_qparams.format, self.input_qparams.granularity,
                                         found["input_scale"], found.get("input_zero_point"))
        self._install(self.backend.build(packed, self.input_qparams))
        if "bias" in found:
            self.bias = found["bias"].float().clone()
        if "outlier_index" in found:
            self._set_outliers((found["outlier_index"], found["outlier_weight"]))
