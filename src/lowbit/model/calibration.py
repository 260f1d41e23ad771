"""Run calibration data through a model and record what each target layer sees."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from lowbit.formats import rotate


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
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Running min/max (per tensor) and absmax (per input channel) of each target layer's
    input over the calibration data (of the rotated input, for a scheme that rotates it)."""
    ranges: dict[str, list[torch.Tensor]] = {}

    def hook_for(name, scheme):
        rotation = scheme.weight.rotation

        def hook(module, args):
            x = args[0].detach().float()
            if rotation is not None:
                x = rotate(x, rotation)  # the layer quantizes its rotated input
            lo, hi = torch.aminmax(x)
            chan = x.abs().reshape(-1, x.shape[-1]).amax(0)
            if name in ranges:
                ranges[name][0] = torch.minimum(ranges[name][0], lo)
                ranges[name][1] = torch.maximum(ranges[name][1], hi)
                ranges[name][2] = torch.maximum(ranges[name][2], chan)
            else:
                ranges[name] = [lo, hi, chan]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, s)) for n, m, s in targets]
    try:
        run_calibration(model, calibration, progress)
    finally:
        for h in handles:
            h.remove()
    return {n: InputStats(*r) for n, r in ranges.items()}
