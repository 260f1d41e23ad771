"""Observers from distribution statistics: percentiles and mean +- k standard deviations.

- ``PercentileObserver`` clips the rare extreme values: symmetric, the range is
  ``[-a, a]`` with ``a`` the ``percentile``-th percentile of ``|x|``; asymmetric, the
  ``(100 - percentile)``-th and ``percentile``-th percentiles of ``x`` (McKinstry et al.,
  2019, "Discovering Low-Precision Networks Close to Full-Precision Networks for Efficient
  Inference"; Wu et al., 2020, "Integer Quantization for Deep Learning Inference:
  Principles and Empirical Evaluation", sec. 4.1, the 99.99th-99.999th percentiles).
  Streaming: an exact histogram whose range doubles (``StreamingHistogram``); the estimate
  is within one bin width ``w <= 2 max|x| / bins`` of the order statistic at the requested
  rank (``x_(floor t) - w <= estimate <= x_(ceil t) + w`` for ``t = q (N - 1)``, the rank
  ``torch.quantile`` interpolates at), and never outside the observed extremes.
- ``MeanStdObserver``: the range ``mean +- k std`` (population std), clipped to the
  observed extremes by default. Streaming moments combine exactly with the parallel
  variance update of Chan, Golub and LeVeque (1979) in float64 (Welford's update for one
  element at a time is its special case).
"""

from __future__ import annotations

import torch

from lowbit.formats.base import NumberFormat
from lowbit.formats.granularity import Granularity
from lowbit.observers.base import Observer, check_option, register_observer
from lowbit.observers.histogram import StreamingHistogram


@register_observer("pct")
class PercentileObserver(Observer):
    """Range from a high percentile of the data seen (see the module docstring)."""

    name = "percentile"

    def __init__(
        self,
        fmt: NumberFormat | str = "int8",
        granularity: Granularity | str = "tensor",
        *,
        symmetric: bool = True,
        scale_dtype: str = "fp32",
        percentile: float = 99.99,
        bins: int = 2048,
    ) -> None:
        check_option(
            50.0 < percentile <= 100.0,
            f"percentile must be in (50, 100], got {percentile} (e.g. 99.99)",
        )
        self.percentile = float(percentile)
        self.bins = bins
        super().__init__(fmt, granularity, symmetric=symmetric, scale_dtype=scale_dtype)

    def _reset_state(self) -> None:
        # symmetric reads |x|, which needs both sides on one bin grid
        self.histogram = StreamingHistogram(self.bins, shared_edge=self.symmetric)

    def _observe(self, rows, valid, batch_min, batch_max) -> None:
        self.histogram.add(rows, valid)

    def _range(self):
        q = self.percentile / 100.0
        if self.symmetric:
            amax = self.histogram.quantile(q, magnitude=True)
            return -amax, amax
        return self.histogram.quantile(1.0 - q), self.histogram.quantile(q)

    def error_bound(self) -> torch.Tensor:
        """Largest bin width per parameter: the estimate's accuracy (see module docstring)."""
        return self.histogram.width.amax(1).float().reshape(self._param_shape)


@register_observer("mean_std", "sigma")
class MeanStdObserver(Observer):
    """Range ``mean +- k * std`` from streaming moments (see the module docstring)."""

    name = "meanstd"

    def __init__(
        self,
        fmt: NumberFormat | str = "int8",
        granularity: Granularity | str = "tensor",
        *,
        symmetric: bool = True,
        scale_dtype: str = "fp32",
        k: float = 3.0,
        clip_to_observed: bool = True,
    ) -> None:
        check_option(k > 0, f"k (the number of standard deviations) must be > 0, got {k}")
        self.k = float(k)
        self.clip_to_observed = clip_to_observed
        super().__init__(fmt, granularity, symmetric=symmetric, scale_dtype=scale_dtype)

    def _reset_state(self) -> None:
        self.count: torch.Tensor | None = None  # (P,) float64
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None  # sum of squared deviations from the mean
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _observe(self, rows, valid, batch_min, batch_max) -> None:
        x = rows.to(torch.float64)
        if valid is None:
            n_b = torch.full((x.shape[0],), float(x.shape[1]), dtype=x.dtype, device=x.device)
            mean_b = x.mean(1)
            m2_b = (x - mean_b.unsqueeze(1)).square().sum(1)
        else:
            w = valid.to(x.dtype)
            n_b = w.sum(1)
            mean_b = (x * w).sum(1) / n_b
            m2_b = ((x - mean_b.unsqueeze(1)).square() * w).sum(1)
        if self.count is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            self.min_val, self.max_val = batch_min.clone(), batch_max.clone()
            return
        # Chan et al. (1979): combine two sets' (count, mean, M2) exactly
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / n)
        self.count = n
        self.min_val = torch.minimum(self.min_val, batch_min)
        self.max_val = torch.maximum(self.max_val, batch_max)

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation per parameter (flat, float64)."""
        return (self.m2 / self.count).sqrt()

    def _range(self):
        lo = self.mean - self.k * self.std
        hi = self.mean + self.k * self.std
        if self.clip_to_observed:
            lo = torch.maximum(lo, self.min_val.to(lo.dtype))
            hi = torch.minimum(hi, self.max_val.to(hi.dtype))
        return lo, hi
