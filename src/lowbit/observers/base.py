"""The observer contract: feed batches with ``update``, read parameters with ``compute``.

An observer is a streaming range estimator for calibration (Jacob et al., 2018, sec. 3;
Nagel et al., 2021, "A White Paper on Neural Network Quantization", sec. 3.5). It sees the
data one batch at a time, keeps a bounded summary (running extremes, moments or a
histogram), and turns that summary into a range ``[min, max]`` per parameter. The range
becomes a scale / zero-point only through ``lowbit.formats.qparams_from_range``, so every
observer yields parameters exactly as the format layer would build them.

Granularity (which elements share one parameter):

- ``tensor``: one range for everything seen.
- ``channel`` on ``axis``: one range per index of ``axis``; every batch must have the same
  size on that axis. For activations of shape ``(..., hidden)`` use ``axis=-1``: batches
  may differ in their leading (batch, token) dimensions.
- ``group``: one range per group, for tensors that keep the same shape in every batch
  (weights). Elements a ragged last group pads with are left out of every statistic.
- ``token``: a per-token scale can only be computed at run time (dynamic quantization),
  since the tokens of a later batch are not the ones observed. A *static* per-token
  observer therefore treats every token row of every batch as one more sample of the same
  activation and pools them into a single per-tensor range: ``compute`` returns parameters
  with ``PER_TENSOR`` granularity that fit any number of tokens. For one scale per hidden
  channel use ``channel`` with ``axis=-1`` instead.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import NumberFormat, get_format
from lowbit.formats.granularity import PER_TENSOR, Granularity
from lowbit.formats.scaling import QParams, check_finite_stats, minmax, qparams_from_range


class ObserverError(LowbitError, ValueError):
    """An observer asked for something it cannot answer: no data yet, an unknown name,
    a batch whose shape does not fit the earlier ones, or an invalid option."""


def observation_rows(
    x: torch.Tensor, granularity: Granularity
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` as rows of elements that share one parameter, and a mask of the real elements.

    The mask is ``None`` unless a ragged last group was padded (see ``Granularity.rows``).
    """
    rows = granularity.rows(x)
    if granularity.kind != "group" or x.shape[-1] % granularity.group_size == 0:
        return rows, None
    k, g = x.shape[-1], granularity.group_size
    per_row = torch.arange(math.ceil(k / g) * g, device=x.device) < k
    valid = per_row.reshape(-1, g).repeat(math.prod(x.shape[:-1]), 1)
    return rows, valid


class Observer:
    """Base class. Subclasses implement ``_reset_state``, ``_observe`` and ``_range``."""

    name: ClassVar[str] = "abstract"

    def __init__(
        self,
        fmt: NumberFormat | str = "int8",
        granularity: Granularity | str = "tensor",
        *,
        symmetric: bool = True,
        scale_dtype: str = "fp32",
    ) -> None:
        self.fmt = get_format(fmt)
        self.granularity = Granularity.parse(granularity)
        self.symmetric = bool(symmetric)
        self.scale_dtype = scale_dtype
        # fail now, not after a long calibration, on a format / symmetry / dtype mismatch
        zero = torch.zeros(())
        qparams_from_range(zero, zero, self.fmt, symmetric=self.symmetric, scale_dtype=scale_dtype)
        self.reset()

    # -- public API --------------------------------------------------------------------
    @property
    def qparams_granularity(self) -> Granularity:
        """Granularity of the parameters ``compute`` returns (``token`` pools to tensor)."""
        return PER_TENSOR if self.granularity.kind == "token" else self.granularity

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self.num_batches = 0
        self.num_elements = 0
        self._param_shape: tuple[int, ...] | None = None
        self._reset_state()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Add one batch to the statistics; returns ``x`` unchanged (usable as a hook)."""
        granularity = self.qparams_granularity
        lo, hi = minmax(x, granularity)  # checks dtype and emptiness
        check_finite_stats(lo, hi)  # NaN / Inf anywhere in x reach these
        shape = tuple(lo.shape)
        if self._param_shape is None:
            self._param_shape = shape
        elif shape != self._param_shape:
            raise ObserverError(
                f"{self.name} observer with {granularity} granularity saw parameters of shape "
                f"{self._param_shape} before and {shape} now (batch shape {tuple(x.shape)}); "
                f"every batch must have the same size on the quantized axis (call reset() "
                f"to start over with a new shape)"
            )
        rows, valid = observation_rows(x.detach(), granularity)
        self._observe(rows, valid, lo.reshape(-1), hi.reshape(-1))
        self.num_batches += 1
        self.num_elements += x.numel()
        return x

    __call__ = update

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimated ``(min, max)`` per parameter (float32, shape of the parameters)."""
        if self.num_batches == 0:
            raise ObserverError(
                f"{self.name} observer has seen no data: call update(x) with calibration "
                f"batches before compute()"
            )
        lo, hi = self._range()
        assert self._param_shape is not None
        return lo.float().reshape(self._param_shape), hi.float().reshape(self._param_shape)

    def compute(self) -> QParams:
        """Scale and zero-point for the data seen, via ``qparams_from_range``."""
        lo, hi = self.compute_range()
        return self._qparams(lo, hi, self.qparams_granularity)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(fmt={self.fmt.name}, granularity={self.granularity}, "
            f"symmetric={self.symmetric}, scale_dtype={self.scale_dtype}, "
            f"batches={self.num_batches})"
        )

    # -- helpers for subclasses --------------------------------------------------------
    def _qparams(self, lo: torch.Tensor, hi: torch.Tensor, granularity: Granularity) -> QParams:
        return qparams_from_range(
            lo, hi, self.fmt, granularity, symmetric=self.symmetric, scale_dtype=self.scale_dtype
        )

    def _reset_state(self) -> None:
        raise NotImplementedError

    def _observe(
        self,
        rows: torch.Tensor,
        valid: torch.Tensor | None,
        batch_min: torch.Tensor,
        batch_max: torch.Tensor,
    ) -> None:
        """Fold one batch in. ``rows``: ``(P, n)``, one row per parameter; ``valid``: mask of
        real elements or ``None``; ``batch_min`` / ``batch_max``: ``(P,)`` extremes of the
        rows (a padded ragged group counts its zero padding here, as layer 1 does)."""
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` per parameter, flat ``(P,)``."""
        raise NotImplementedError


def check_option(ok: bool, message: str) -> None:
    if not ok:
        raise ObserverError(message)


# -- registry ----------------------------------------------------------------------------
_REGISTRY: dict[str, type[Observer]] = {}
_ALIASES: dict[str, str] = {}


def register_observer(*aliases: str):
    """Class decorator: make an observer available to ``get_observer`` by its ``name``."""

    def wrap(cls: type[Observer]) -> type[Observer]:
        _REGISTRY[cls.name] = cls
        for alias in aliases:
            _ALIASES[alias] = cls.name
        return cls

    return wrap


def list_observers() -> list[str]:
    """Names ``get_observer`` accepts (aliases not included), sorted."""
    return sorted(_REGISTRY)


def get_observer(
    name: str,
    fmt: NumberFormat | str = "int8",
    granularity: Granularity | str = "tensor",
    **options,
) -> Observer:
    """A new observer called ``name``; ``options`` are passed to its constructor."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ObserverError(
            f"unknown observer {name!r}; valid observers: {', '.join(_REGISTRY)}"
            + (f" (aliases: {', '.join(sorted(_ALIASES))})" if _ALIASES else "")
        )
    return _REGISTRY[key](fmt, granularity, **options)
