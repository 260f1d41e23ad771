"""Observers of the extremes: running min/max, running absmax and their moving average.

- ``MinMaxObserver``: the smallest and largest value seen (Jacob et al., 2018; PyTorch's
  ``MinMaxObserver``). On the concatenated batches it gives exactly the parameters
  ``lowbit.formats.compute_qparams`` computes.
- ``AbsMaxObserver``: the largest magnitude seen, as the symmetric range ``[-a, a]``.
- ``MovingAverageMinMaxObserver``: an exponential moving average of each batch's min and
  max, ``m <- m + c * (batch_m - m)`` after the first batch sets ``m`` (Jacob et al., 2018,
  sec. 3.1; PyTorch's ``MovingAverageMinMaxObserver``, ``averaging_constant`` = c).
"""

from __future__ import annotations

import torch

from lowbit.formats.base import NumberFormat
from lowbit.formats.granularity import Granularity
from lowbit.observers.base import Observer, check_option, register_observer


@register_observer("min_max", "running_minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum per parameter."""

    name = "minmax"

    def _reset_state(self) -> None:
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _observe(self, rows, valid, batch_min, batch_max) -> None:
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = batch_min.clone(), batch_max.clone()
        else:
            self.min_val = torch.minimum(self.min_val, batch_min)
            self.max_val = torch.maximum(self.max_val, batch_max)

    def _range(self):
        return self.min_val, self.max_val


@register_observer("abs_max", "amax")
class AbsMaxObserver(Observer):
    """Running maximum of ``|x|`` per parameter; the range is ``[-amax, amax]``."""

    name = "absmax"

    def _reset_state(self) -> None:
        self.amax: torch.Tensor | None = None

    def _observe(self, rows, valid, batch_min, batch_max) -> None:
        batch = torch.maximum(batch_min.abs(), batch_max.abs())
        self.amax = batch if self.amax is None else torch.maximum(self.amax, batch)

    def _range(self):
        return -self.amax, self.amax


@register_observer("moving_average", "moving_average_minmax", "ema_minmax")
class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of the per-batch min and max.

    Per channel, each channel's batch extremes are averaged; per token, the extremes of the
    whole batch (all its tokens) are one sample of the average.
    """

    name = "ema"

    def __init__(
        self,
        fmt: NumberFormat | str = "int8",
        granularity: Granularity | str = "tensor",
        *,
        symmetric: bool = True,
        scale_dtype: str = "fp32",
        averaging_constant: float = 0.01,
    ) -> None:
        check_option(
            0.0 < averaging_constant <= 1.0,
            f"averaging_constant must be in (0, 1], got {averaging_constant} "
            f"(1 keeps only the last batch; PyTorch's default is 0.01)",
        )
        self.averaging_constant = float(averaging_constant)
        super().__init__(fmt, granularity, symmetric=symmetric, scale_dtype=scale_dtype)

    def _observe(self, rows, valid, batch_min, batch_max) -> None:
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = batch_min.clone(), batch_max.clone()
            return
        c = self.averaging_constant
        self.min_val = self.min_val + c * (batch_min - self.min_val)
        self.max_val = self.max_val + c * (batch_max - self.max_val)
