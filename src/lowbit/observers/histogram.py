"""A streaming histogram per parameter whose range grows by exact doubling.

Used by the percentile, MSE and KL observers. Each parameter keeps two histograms of
``bins`` bins over magnitudes ``[0, edge]``: side 0 for negative values (``|x|``), side 1
for values ``>= 0``. Bin ``j`` of a side holds magnitudes in ``(j w, (j + 1) w]`` with
``w = edge / bins`` (bin 0 also holds 0). Right-closed bins make doubling exact even for
values equal to an old edge.

Growing without re-binning error: the first batch sets ``edge`` to its exact largest
magnitude. When a later batch exceeds it, ``edge`` doubles (as often as needed) and each
doubling merges adjacent pairs of bins into the lower half, an exact operation (unlike
PyTorch's ``HistogramObserver``, which interpolates when it re-bins). So the summary is
always the exact histogram of all data at the final bin width, with

    ``w = edge / bins <= 2 * max|x| / bins``    (``edge < 2 max|x|`` once it has grown).

Anything read from the histogram is therefore accurate to one bin width ``w``; the exact
extremes are tracked beside it. Memory: ``2 * bins`` int64 counts per parameter.
"""

from __future__ import annotations

import math

import torch

from lowbit.observers.base import ObserverError

#: refuse histograms above this many counts (1 GiB of int64) with a clear message
MAX_ENTRIES = 1 << 27


class StreamingHistogram:
    """Histograms of negative and non-negative magnitudes for ``P`` parameters."""

    def __init__(self, bins: int = 2048, *, shared_edge: bool = False) -> None:
        if bins < 2 or bins % 2:
            raise ObserverError(f"histogram bins must be an even number >= 2, got {bins}")
        self.bins = int(bins)
        #: when True both sides use one edge (the larger), so their bins line up
        self.shared_edge = shared_edge
        self.counts: torch.Tensor | None = None  # (P, 2, bins) int64
        self.edge: torch.Tensor | None = None  # (P, 2) float64
        self.amax: torch.Tensor | None = None  # (P, 2) float64, exact largest magnitudes
        self.extremes: torch.Tensor | None = None  # (P, 3): exact min, max and min |x|

    @property
    def num_params(self) -> int:
        return 0 if self.counts is None else self.counts.shape[0]

    @property
    def width(self) -> torch.Tensor:
        """Bin width per parameter and side, ``(P, 2)``."""
        return self.edge / self.bins

    # -- updating ----------------------------------------------------------------------
    def add(self, rows: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count the elements of ``rows`` (``(P, n)``); ``valid`` masks padding out."""
        p, b = rows.shape[0], self.bins
        if self.counts is None:
            if p * 2 * b > MAX_ENTRIES:
                raise ObserverError(
                    f"a histogram of {b} bins for {p} parameters needs {p * 2 * b * 8 / 2**30:.1f}"
                    f" GiB; use fewer bins, a coarser granularity or a non-histogram observer"
                )
            self.counts = torch.zeros(p, 2, b, dtype=torch.int64, device=rows.device)
            self.edge = torch.zeros(p, 2, dtype=torch.float64, device=rows.device)
            self.amax = torch.zeros(p, 2, dtype=torch.float64, device=rows.device)
        x = rows.to(torch.float64)
        mag = x.abs()
        side = (x >= 0).long()
        inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
        if valid is None:
            batch = torch.stack([x.amin(1), x.amax(1), mag.amin(1)], 1)
        else:
            mag = torch.where(valid, mag, 0.0)
            batch = torch.stack(
                [
                    torch.where(valid, x, inf).amin(1),
                    torch.where(valid, x, -inf).amax(1),
                    torch.where(valid, mag, inf).amin(1),
                ],
                1,
            )
        if self.extremes is None:
            self.extremes = batch
        else:
            lows = torch.minimum(self.extremes[:, [0, 2]], batch[:, [0, 2]])
            self.extremes = torch.stack(
                [lows[:, 0], torch.maximum(self.extremes[:, 1], batch[:, 1]), lows[:, 1]], 1
            )
        batch_amax = torch.stack(
            [torch.where(side == 0, mag, 0.0).amax(1), torch.where(side == 1, mag, 0.0).amax(1)], 1
        )
        self.amax = torch.maximum(self.amax, batch_amax)
        target = self.amax
        if self.shared_edge:
            target = target.amax(1, keepdim=True).expand(-1, 2)
        self._grow(target)
        edge = torch.gather(self.edge, 1, side)
        idx = torch.where(edge > 0, torch.ceil(mag / edge * b) - 1, 0.0).clamp_(0, b - 1).long()
        flat = (torch.arange(p, device=x.device).unsqueeze(1) * 2 + side) * b + idx
        if valid is not None:
            flat = flat[valid]
        self.counts += torch.bincount(flat.reshape(-1), minlength=p * 2 * b).view(p, 2, b)

    def _grow(self, target: torch.Tensor) -> None:
        """Double ``edge`` until it covers ``target``, merging pairs of bins each time."""
        edge = torch.where(self.edge == 0, target, self.edge)  # counts at edge 0 sit in bin 0
        k = torch.zeros_like(edge)
        grow = target > edge
        if grow.any():
            k = torch.where(grow, torch.ceil(torch.log2(target / edge)), k)
            # guard rounding in log2: the smallest k with edge * 2^k >= target
            k = torch.where(edge * torch.exp2(k) < target, k + 1, k)
            k = torch.where((k > 1) & (edge * torch.exp2(k - 1) >= target), k - 1, k)
            steps = min(int(k.max()), math.ceil(math.log2(self.bins)) + 1)  # then all in bin 0
            counts = self.counts
            for step in range(steps):
                merged = counts.view(*counts.shape[:2], -1, 2).sum(-1)
                merged = torch.cat([merged, torch.zeros_like(merged)], -1)
                counts = torch.where((k > step).unsqueeze(-1), merged, counts)
            self.counts = counts
        self.edge = edge * torch.exp2(k)

    # -- reading -----------------------------------------------------------------------
    def signed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Counts, lower and upper bin edges in ascending value order, each ``(P, 2 bins)``.

        Negative bins come first (most negative first), then the non-negative ones."""
        j = torch.arange(self.bins, dtype=torch.float64, device=self.counts.device)
        w = self.width
        neg_lo = (-(j + 1) * w[:, :1]).flip(-1)
        pos_lo = j * w[:, 1:]
        lows = torch.cat([neg_lo, pos_lo], 1)
        highs = torch.cat([neg_lo + w[:, :1], pos_lo + w[:, 1:]], 1)
        counts = torch.cat([self.counts[:, 0].flip(-1), self.counts[:, 1]], 1)
        return counts, lows, highs

    def magnitude(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Counts, lower and upper edges of the histogram of ``|x|``, each ``(P, bins)``."""
        if not self.shared_edge:
            raise ObserverError("a magnitude histogram needs shared_edge=True")
        j = torch.arange(self.bins, dtype=torch.float64, device=self.counts.device)
        w = self.width[:, :1]
        return self.counts.sum(1), j * w, (j + 1) * w

    def quantile(self, q: float, *, magnitude: bool = False) -> torch.Tensor:
        """Estimate of the ``q``-quantile (0..1) per parameter, ``(P,)`` float64.

        With ``t = q (N - 1)`` (torch.quantile's rank), the estimate lies in the bin that
        holds the order statistic ``x_(floor t)``, interpolated inside it, and within the
        observed extremes; so ``x_(floor t) - w <= estimate <= x_(ceil t) + w``.
        """
        counts, lows, highs = self.magnitude() if magnitude else self.signed()
        counts = counts.to(torch.float64)
        cum = counts.cumsum(1)
        t = q * (cum[:, -1:] - 1)
        i = torch.searchsorted(cum, t, right=True).clamp_(max=counts.shape[1] - 1)
        n_i = counts.gather(1, i)
        before = cum.gather(1, i) - n_i
        frac = ((t - before + 0.5) / n_i.clamp_min(1)).clamp(0, 1)
        lo_i, hi_i = lows.gather(1, i), highs.gather(1, i)
        est = (lo_i + frac * (hi_i - lo_i)).squeeze(1)
        if magnitude:
            low_end, high_end = self.extremes[:, 2], self.amax.amax(1)
        else:
            low_end, high_end = self.extremes[:, 0], self.extremes[:, 1]
        return torch.minimum(torch.maximum(est, low_end), high_end)
