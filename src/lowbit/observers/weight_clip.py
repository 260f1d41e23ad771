"""Clipping a weight's range: the per-parameter ratio with the least quantization error.

A weight is seen once and whole, so unlike the streaming observers this searches on the
tensor itself: for each ratio ``r`` on a grid (1.0 down to 0.7 in steps of 0.025), the range
``r * [min, max]`` of every row / group gives parameters (``qparams_from_range``: exactly the
scale and zero-point that will be stored), and each parameter keeps the ratio whose
``sum (w - dequantize(quantize(w)))^2`` over its elements is smallest (the MMSE clipping of
Choukroun et al., 2019, solved on a grid as in AWQ's clip search, Lin et al., 2024).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lowbit.formats.granularity import Granularity
from lowbit.formats.scaling import QParams, dequantize, minmax, quantize
from lowbit.formats.spec import WeightSpec

#: the clipping ratios tried, largest first (ties keep the larger range)
WEIGHT_CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(13))


def mse_clipped(w: torch.Tensor, spec: WeightSpec,
                ratios: Iterable[float] | None = None) -> tuple[torch.Tensor, QParams]:
    """Codes and parameters of ``w`` with each parameter's range clipped by the best ratio.
    The parameters come from the chosen ranges in one call, so the groups of a super-block
    dtype (``formats.superblock``), which share a float16 scale, are snapped together."""
    gran = spec.granularity

    best_lo, best_hi = best_clip_range(w, gran, spec.range_qparams,
                                       ratios or WEIGHT_CLIP_RATIOS)
    qp = spec.range_qparams(best_lo, best_hi)
    return quantize(w, qp), qp


def best_clip_range(w: torch.Tensor, gran: Granularity, qparams: Callable,
                    ratios: Iterable[float], norm: float = 2.0):
    """Per parameter, the range ``r * [min, max]`` (``r`` in ``ratios``, the first wins ties)
    whose parameters ``qparams(lo, hi)`` give the least ``sum |w - q(w)|^norm``."""
    lo, hi = minmax(w, gran)
    best_err = best_lo = best_hi = None
    for r in ratios:
        qp = qparams(lo * r, hi * r)
        diff = dequantize(quantize(w, qp), qp) - w
        err = gran.rows(diff ** 2 if norm == 2.0 else diff.abs_().pow_(norm)).sum(-1)
        err = err.reshape(qp.scale.shape)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo * r, hi * r
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * r, best_lo)
        best_hi = torch.where(better, hi * r, best_hi)
    return best_lo, best_hi
