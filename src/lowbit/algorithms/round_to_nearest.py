"""Round to nearest (RTN): each weight to the nearest grid point of its row's or group's range.

The range comes from the scheme's weight observer: ``minmax`` (min/max, or absmax when
symmetric: ``WeightSpec.qparams``) or ``mse`` (``observers.mse_clipped``: the clipping ratio
with the least squared error per parameter). A rotated scheme quantizes ``W @ H``
(``formats.rotation``). RTN is also every calibrated algorithm's fallback without data.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lowbit.algorithms.base import QuantResult, check_weight
from lowbit.algorithms.registry import Algorithm, register
from lowbit.formats import QParams, WeightSpec, quantize, rotate
from lowbit.observers.weight_clip import mse_clipped

#: weight observers a scheme may name
WEIGHT_OBSERVERS = ("minmax", "mse")

#: row-local granularities (per channel, per group) are quantized this many rows at a time,
#: so the temporaries of a large layer (SmolLM2's 49152 x 576 head: 113 MB per float copy)
#: stay small; the codes and parameters are the same as in one piece
CHUNK_ROWS = 4096


def quantize_weight(weight: torch.Tensor, spec: WeightSpec,
                    observer: str = "minmax") -> tuple[torch.Tensor, QParams]:
    """Codes and parameters for one weight under ``spec`` (of ``W @ H`` when it rotates)."""
    gran = spec.granularity
    row_local = weight.dim() == 2 and (gran.kind == "group" or (gran.kind == "channel"
                                                                and gran.axis == 0))
    if row_local and weight.shape[0] > CHUNK_ROWS:
        parts = [_quantize_rows(weight[i:i + CHUNK_ROWS], spec, observer)
                 for i in range(0, weight.shape[0], CHUNK_ROWS)]
        first = parts[0][1]
        zero = None if first.zero_point is None else torch.cat([q.zero_point for _, q in parts])
        return torch.cat([c for c, _ in parts]), replace(
            first, scale=torch.cat([q.scale for _, q in parts]), zero_point=zero)
    return _quantize_rows(weight, spec, observer)


def _quantize_rows(weight: torch.Tensor, spec: WeightSpec, observer: str):
    w = weight.detach().float()
    if spec.rotation is not None:
        w = rotate(w.double(), spec.rotation).float()
    if observer == "mse":
        return mse_clipped(w, spec)
    qparams = spec.qparams(w)
    return quantize(w, qparams), qparams


def rtn(W: torch.Tensor, spec: WeightSpec, observer: str = "minmax") -> QuantResult:
    """``quantize_weight`` as a ``QuantResult`` (the algorithms' common result type)."""
    codes, qparams = quantize_weight(check_weight(W), spec, observer)
    return QuantResult(codes, qparams, info={"algorithm": "rtn"})


def _solve(W, scheme, stats, s, options):
    codes, qparams = quantize_weight(W, scheme.weight, scheme.observer)
    return codes, qparams, {"algorithm": "rtn"}


register(Algorithm("rtn", "round to nearest (min/max or MSE-clipped range)", _solve,
                   rotates=True))
