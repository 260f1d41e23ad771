"""Run calibration data through a model and record what each target layer sees."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from lowbit.formats import Granularity, rotate
from lowbit.observers import AbsMaxObserver, MinMaxObserver


def _as_inputs(batch):
    """A calibration item as (args, kwargs) for ``model(...)``."""
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def run_calibration(model: nn.Module, calibration: Iterable, progress: bool = True) -> int:
    """Feed every calibration item to ``model`` (no gradients); returns the item count."""
    items = calibration
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(calibration, desc="calibrating", unit="batch", leave=False, disable=None)
    count = 0
    with torch.inference_mode():
        for batch in items:
            args, kwargs = _as_inputs(batch)
            model(*args, **kwargs)
            count += 1
    if count == 0:
        from lowbit.model.recipe import RecipeError

        raise RecipeError("the calibration data is empty: pass at least one batch")
    return count


class InputStats(NamedTuple):
    """What a layer's inputs spanned over the calibration data."""

    min: torch.Tensor  # per tensor
    max: torch.Tensor  # per tensor
    channel_absmax: torch.Tensor  # per input channel, [in_features]


def collect_input_ranges(
    model: nn.Module,
    targets: list[tuple[str, nn.Module, object]],
    calibration: Iterable,
    *,
    progress: bool = True,
) -> dict[str, InputStats]:
    """Running min/max (per tensor) and absmax (per input channel) of each target layer's
    input over the calibration data (of the rotated input, for a scheme that rotates it),
    kept by the observers layer (``MinMaxObserver``, ``AbsMaxObserver``)."""
    observers: dict[str, tuple[MinMaxObserver, AbsMaxObserver]] = {}

    def hook_for(name, scheme):
        rotation = scheme.weight.rotation

        def hook(module, args):
            x = args[0].detach().float()
            if rotation is not None:
                x = rotate(x, rotation)  # the layer quantizes its rotated input
            if name not in observers:
                observers[name] = (MinMaxObserver("int8", "tensor", symmetric=False),
                                   AbsMaxObserver("int8", Granularity.per_channel(-1)))
            for observer in observers[name]:
                observer.update(x)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, s)) for n, m, s in targets]
    try:
        run_calibration(model, calibration, progress)
    finally:
        for h in handles:
            h.remove()
    return {n: InputStats(lo.min_val.reshape(()), lo.max_val.reshape(()), chan.amax)
            for n, (lo, chan) in observers.items()}
