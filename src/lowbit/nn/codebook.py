"""Per-row codebooks (k-means weight sharing): packed indices plus a small table per row.

Deep Compression (Han et al., 2016) and SqueezeLLM (Kim et al., 2024) store, for each output
row (or group), ``2^bits`` centroids and one ``bits``-wide index per weight:

    w[n, k] = centroids[n, g(k), index[n, k]]

Storage rides on lowbit's canonical ``PackedWeight`` so ``save`` / ``load`` need nothing new:
- the format is ``codebook<b>`` (registered here, ``b`` = 1..8): a lookup format whose
  values are the indices ``0 .. 2^b - 1``, so ``qdata`` is the indices packed ``b`` bits
  each (``formats.packing``);
- ``qparams.scale`` holds the centroids, ``[out, 2^b]`` for ``channel`` granularity or
  ``[out, groups, 2^b]`` for ``group:N``, in the spec's ``scale_dtype`` (fp16 by default);
  ``zero_point`` is None.
Bits per weight are therefore ``b + 2^b * 16 / in_features`` per row (4-bit, 576 inputs:
4.44) and ``QuantizedLinear.weight_nbytes`` counts exactly those bytes.

``CodebookBackend`` keeps the packed indices in memory and dequantizes per call (gather, then
``F.linear``); ``reference_forward`` goes through ``CodebookPackedWeight.dequantize``, which
does the same gather in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import Granularity, QParams, get_format, pack, unpack
from lowbit.formats.lookup import (  # noqa: F401  (re-exported: the codebook formats)
    CODEBOOK_FORMATS,
    PREFIX,
    codebook_format,
    is_row_codebook,
)
from lowbit.kernels import weight_dequant
from lowbit.nn.activation import ModuleError
from lowbit.nn.packed import PackedWeight, WeightSpec


def gather_rows(indices: torch.Tensor, centroids: torch.Tensor, gran: Granularity,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``centroids[n, g(k), indices[n, k]]`` as a ``[out, in]`` tensor of ``dtype``."""
    out, k = indices.shape
    levels = centroids.shape[-1]
    table = centroids.to(dtype).reshape(-1, levels)
    if gran.kind == "group":
        rows = gran.rows(indices.to(torch.int64))  # [out * groups, group_size], zero-padded
        return table.gather(1, rows).reshape(out, -1)[:, :k]
    return table.gather(1, indices.to(torch.int64))


class CodebookPackedWeight(PackedWeight):
    """A ``PackedWeight`` whose ``scale`` is the per-row centroid table."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return gather_rows(self.codes(), self.qparams.scale.float(), self.qparams.granularity,
                           torch.float32).to(dtype)


def packed_codebook(indices: torch.Tensor, centroids: torch.Tensor, spec: WeightSpec
                    ) -> CodebookPackedWeight:
    """Pack ``indices`` (uint8 ``[out, in]``) with ``centroids`` (cast to the spec's dtype)."""
    fmt = get_format(spec.format)
    if not is_row_codebook(fmt):
        raise ModuleError(f"{spec.format} is not a codebook<b> format")
    gran = spec.granularity
    expected = gran.param_shape(tuple(indices.shape)) + (1 << fmt.bits,)
    if tuple(centroids.shape) != expected:
        raise ModuleError(f"centroids must have shape {expected} for {spec.granularity} and "
                          f"{fmt.bits}-bit indices, got {tuple(centroids.shape)}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.scale_dtype, torch.float32)
    qp = QParams(fmt, gran, centroids.to(dtype).contiguous(), None, spec.scale_dtype)
    return CodebookPackedWeight(pack(indices.to(torch.uint8), fmt.bits), qp, indices.shape[-1])


class CodebookBackend:
    """Per-row codebook weights: packed indices + centroids, dequantized on every call."""

    name = "codebook"
    kernel_name = "codebook+F.linear"

    def __init__(self, spec: WeightSpec, activation) -> None:
        if activation is not None:
            raise ModuleError("codebook weights run weight-only: drop the activation spec")
        gran = spec.granularity
        if gran.kind not in ("channel", "group") or (gran.kind == "channel" and gran.axis != 0):
            raise ModuleError(f"codebooks are per output row or per group, got {spec.granularity}")
        self.spec = spec
        self.activation = None

    def build(self, packed: PackedWeight, input_qparams=None) -> CodebookPackedWeight:
        return CodebookPackedWeight(packed.qdata, packed.qparams, packed.in_features)

    def tensors(self, state):
        return {"w_qdata": state.qdata, "w_centroids": state.qparams.scale}

    def from_tensors(self, tensors, old_state):
        from dataclasses import replace

        qp = replace(old_state.qparams, scale=tensors["w_centroids"])
        return CodebookPackedWeight(tensors["w_qdata"], qp, old_state.in_features)

    def to_packed(self, state) -> CodebookPackedWeight:
        return state

    def simulate_input(self, x: torch.Tensor, state) -> torch.Tensor:
        return x

    def decode_callable(self, state, bias, rotation=None):
        """No prebound decode call: the runtime's per-layer step runs ``forward``, and its
        native loop reads the codes through its lookup kernel (``runtime.native_loop``)."""
        return None

    def merged_decode_callable(self, states, biases, rotation=None):
        return None

    def forward(self, x, state, bias):
        dtype = x.dtype if x.dtype != torch.float16 else torch.float32
        qp = state.qparams
        n, k = state.qdata.shape[0], state.in_features
        if qp.format.bits == 4 and weight_dequant.usable(qp.granularity.kind, None, dtype):
            w = weight_dequant.lookup_weight(state.qdata, k, qp.scale.reshape(n, -1, 16),
                                             None, qp.granularity.group_size
                                             if qp.granularity.kind == "group" else k, dtype)
        else:
            indices = unpack(state.qdata, qp.format.bits, k)
            w = gather_rows(indices, qp.scale, qp.granularity, dtype)
        b = None if bias is None else bias.to(dtype)
        return F.linear(x.to(dtype), w, b).to(x.dtype)
