"""Clipping a weight's range: the per-parameter ratio with the least quantization error.

A weight is seen once and whole, so unlike the streaming observers this searches on the
tensor itself: for each ratio ``r`` on a grid (1.0 down to 0.7 in steps of 0.025), the range
``r * [min, max]`` of every row / group gives parameters (``qparams_from_range``: exactly the
scale and zero-point that will be stored), and each parameter keeps the ratio whose
``sum (w - dequantize(quantize(w)))^2`` over its elements is smallest (the MMSE clipping of
Choukroun et al., 2019, solved on a grid as in AWQ's clip search, Lin et al., 2024).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowbit.formats.scaling import QParams, dequantize, minmax, qparams_from_range, quantize
from lowbit.formats.spec import WeightSpec

#: the clipping ratios tried, largest first (ties keep the larger range)
WEIGHT_CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(13))


def mse_clipped(w: torch.Tensor, spec: WeightSpec,
                ratios: Iterable[float] | None = None) -> tuple[torch.Tensor, QParams]:
    """Codes and parameters of ``w`` with each parameter's range clipped by the best ratio."""
    gran = spec.granularity
    lo, hi = minmax(w, gran)
    best_err, best = None, None
    for r in ratios or WEIGHT_CLIP_RATIOS:
        qp = qparams_from_range(lo * r, hi * r, spec.format, gran, symmetric=spec.symmetric,
                                scale_dtype=spec.scale_dtype,
                                integer_zero_point=spec.integer_zero_point)
        codes = quantize(w, qp)
        err = (gran.rows(dequantize(codes, qp) - w) ** 2).sum(-1).reshape(qp.scale.shape)
        if best is None:
            best_err, best = err, (codes, qp)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        mask = gran.expand(better, w.shape)
        best[0].copy_(torch.where(mask, codes, best[0]))
        best[1].scale.copy_(torch.where(better, qp.scale, best[1].scale))
        if qp.zero_point is not None:
            best[1].zero_point.copy_(torch.where(better, qp.zero_point, best[1].zero_point))
    return best
