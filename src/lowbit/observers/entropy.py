"""Entropy calibration: the clipping threshold that minimises KL(P || Q) (Migacz, 2017,
"8-bit Inference with TensorRT", GTC; as in NVIDIA pytorch-quantization's
``HistogramCalibrator(method="entropy")``).

For every candidate threshold ``t`` = the upper edge of bin ``i`` (``i`` from
``start_bin`` up to the bin holding ``max|x|``, every ``stride``-th):

1. ``P``: the histogram cut at ``t``, with the counts beyond ``t`` (the outliers) added to
   the last kept bin, normalised;
2. ``Q``: the kept bins quantized with the parameters ``qparams_from_range`` builds for the
   range clipped at ``t``: bins whose centres get the same code form one level, and each
   level's total is spread evenly over its non-empty bins, normalised;
3. ``KL(P || Q) = sum P log(P / Q)``; infinite where ``Q`` is 0 and ``P`` is not (an
   outlier folded into an empty bin), so such thresholds are never chosen.

The threshold with the smallest divergence wins (ties: the largest). Symmetric, the range
is ``[-t, t]``; asymmetric, the observed range clipped to ``[-t, t]``.

Differences from TensorRT, so that any format of ``lowbit.formats`` works: levels come
from the format's own rounding (``encode``) instead of 128 equal-width groups of bins, and
the histogram is signed (negatives and non-negatives on one bin grid) rather than of
``|x|``, so grids that are not symmetric (NF4, zero-points) are measured on the values
they really quantize. For a symmetric integer grid this differs from TensorRT only in
where level boundaries fall (rounding, not flooring) and in keeping the signs apart.
The histogram (``StreamingHistogram``) spans ``[0, edge]`` with ``max|x| <= edge <
2 max|x|``, so between ``bins / 2`` and ``bins`` bins cover the data. Per-channel
thresholds are searched one parameter at a time, up to ``max_params`` parameters (each
search scores ~2000 thresholds over the histogram: about a second on a laptop core with
the default 2048 bins; ``stride`` > 1 scores fewer).
"""

from __future__ import annotations

import math

import torch

from lowbit.formats.base import NumberFormat
from lowbit.formats.granularity import Granularity
from lowbit.formats.scaling import quantize
from lowbit.observers.base import Observer, ObserverError, check_option, register_observer
from lowbit.observers.histogram import StreamingHistogram

#: histogram cells scored at once while searching (bounds the search's memory)
CHUNK_ELEMENTS = 1 << 21


@register_observer("entropy", "histogram_kl", "tensorrt")
class HistogramKLObserver(Observer):
    """Threshold minimising the KL divergence between the data and its quantized version."""

    name = "kl"

    def __init__(
        self,
        fmt: NumberFormat | str = "int8",
        granularity: Granularity | str = "tensor",
        *,
        symmetric: bool = True,
        scale_dtype: str = "fp32",
        bins: int = 2048,
        start_bin: int = 128,
        stride: int = 1,
        max_params: int = 256,
    ) -> None:
        check_option(start_bin >= 1, f"start_bin must be >= 1, got {start_bin}")
        check_option(stride >= 1, f"stride must be >= 1, got {stride}")
        self.bins = bins
        self.start_bin = int(start_bin)
        self.stride = int(stride)
        self.max_params = int(max_params)
        super().__init__(fmt, granularity, symmetric=symmetric, scale_dtype=scale_dtype)

    def _reset_state(self) -> None:
        self.histogram = StreamingHistogram(self.bins, shared_edge=True)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.threshold: torch.Tensor | None = None

    def _observe(self, rows, valid, batch_min, batch_max) -> None:
        if self.min_val is None and rows.shape[0] > self.max_params:
            raise ObserverError(
                f"KL calibration searches each of the {rows.shape[0]} parameters separately "
                f"(max_params={self.max_params}); raise max_params (and be patient), use a "
                f"coarser granularity, or the 'mse' / 'percentile' observer"
            )
        self.histogram.add(rows, valid)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = batch_min.clone(), batch_max.clone()
        else:
            self.min_val = torch.minimum(self.min_val, batch_min)
            self.max_val = torch.maximum(self.max_val, batch_max)
        self.threshold = None

    def _clip(self, t: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Range for threshold(s) ``t`` of parameter ``p``."""
        if self.symmetric:
            return -t, t
        lo = torch.maximum(self.min_val[p].double(), -t)
        return lo, torch.minimum(self.max_val[p].double(), t)

    def divergences(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate thresholds of parameter ``p`` and ``KL(P || Q)`` for each (float64)."""
        h = self.histogram.counts[p].to(torch.float64)  # (2, B): negatives, non-negatives
        b = self.bins
        w = float(self.histogram.width[p, 0])
        amax = float(self.histogram.amax[p].max())
        if amax == 0.0:  # all zeros: nothing to clip
            return h.new_zeros(1), h.new_zeros(1)
        i_max = min(b, max(1, math.ceil(amax / w - 1e-9)))
        cand = torch.arange(min(self.start_bin, i_max), i_max + 1, self.stride)
        if cand[-1] != i_max:
            cand = torch.cat([cand, torch.tensor([i_max])])
        cand = cand.to(h.device)
        thresholds = (cand.double() * w).clamp(max=amax)
        zero = h.new_zeros(2, 1)
        # outliers[s, i]: counts of side s in bins >= i; hlogh[s, i]: sum of h log h below i
        outliers = torch.cat([h.flip(1).cumsum(1).flip(1), zero], 1)
        hlogh = torch.cat([zero, torch.xlogy(h, h).cumsum(1)], 1)
        # only non-empty bins shape Q: (value of the bin centre, count, bin index j)
        side, j = (h > 0).nonzero(as_tuple=True)
        nonempty_bins = ((2 * side - 1) * (j + 0.5) * w, h[side, j], j)
        kls = []
        for idx in torch.arange(cand.numel(), device=h.device).split(
            max(1, CHUNK_ELEMENTS // max(1, side.numel()))
        ):
            kls.append(
                self._kl_chunk(cand[idx], thresholds[idx], p, h, w, outliers, hlogh, nonempty_bins)
            )
        return thresholds, torch.cat(kls)

    def _kl_chunk(self, cand, t, p, h, w, outliers, hlogh, nonempty_bins) -> torch.Tensor:
        """KL(P || Q) for the candidate bin counts ``cand``, from per-level sums:
        with ``N`` the total count, ``S`` the kept count and ``T_g`` / ``n_g`` the count and
        non-empty bins of level ``g``, ``Q_j = T_g / (n_g S)`` and
        ``N KL = sum ref log ref - sum ref log Q - N log N``."""
        c = cand.numel()
        n_total = h.sum()
        rows = torch.arange(c, device=h.device)
        # sum ref log ref: kept bins below the fold bin, then the fold bin with its outliers
        fold_h = h[:, cand - 1]  # (2, C)
        fold_out = outliers[:, cand]
        fold_ref = fold_h + fold_out
        a = (hlogh[:, cand - 1] + torch.xlogy(fold_ref, fold_ref)).sum(0)
        # levels: quantize the non-empty bins' centres (and the two fold bins' centres)
        centres, counts, j = nonempty_bins
        fold_centres = torch.stack([-(cand - 0.5), cand - 0.5], 1).double() * w  # (C, 2)
        lo, hi = self._clip(t, p)
        qp = self._qparams(lo, hi, Granularity.per_channel(0))
        x = torch.cat([centres.expand(c, -1), fold_centres], 1).float()
        codes = quantize(x, qp).long()
        codes = codes - codes.min()
        levels = int(codes.max()) + 1
        key = (rows.unsqueeze(1) * levels + codes).view(-1)
        kept = torch.cat([j.unsqueeze(0) < cand.unsqueeze(1), cand.new_zeros(c, 2, dtype=bool)], 1)
        weights = torch.cat([counts.expand(c, -1), fold_centres.new_zeros(c, 2)], 1)
        size = c * levels
        total = torch.bincount(key, (weights * kept).view(-1), minlength=size).view(c, -1)
        nonempty = torch.bincount(key, kept.double().view(-1), minlength=size).view(c, -1)
        kept_total = total.sum(1)
        # sum ref log Q over the kept bins, then the outliers folded into the fold bins
        bq = (torch.xlogy(total, total) - torch.xlogy(total, nonempty)).sum(1)
        bq = bq - torch.xlogy(kept_total, kept_total)
        for s in range(2):
            g = codes[:, -2 + s]
            t_g, n_g = total[rows, g], nonempty[rows, g]
            log_q = torch.log(t_g) - torch.log(n_g.clamp_min(1)) - torch.log(kept_total)
            bq = bq + torch.where(fold_out[s] > 0, fold_out[s] * log_q, 0.0)
        kl = (a - bq) / n_total - torch.log(n_total)
        # an outlier folded into an empty bin has Q = 0 there: KL is infinite
        empty_fold = ((fold_h == 0) & (fold_out > 0)).any(0)
        return torch.where(empty_fold | (kept_total == 0), math.inf, kl)

    def thresholds(self) -> torch.Tensor:
        """The chosen threshold per parameter (flat, float64)."""
        if self.threshold is None:
            out = []
            for p in range(self.histogram.num_params):
                t, kl = self.divergences(p)
                best = kl.numel() - 1 - int(kl.flip(0).argmin())  # ties: the largest t
                out.append(t[best].cpu())
            self.threshold = torch.stack(out).to(self.min_val.device)
        return self.threshold

    def _range(self):
        t = self.thresholds()
        if self.symmetric:
            return -t, t
        return torch.maximum(self.min_val.double(), -t), torch.minimum(self.max_val.double(), t)
