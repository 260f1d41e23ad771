"""Run calibration data through a model and record what each target layer sees."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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


def collect_input_ranges(
    model: nn.Module,
    targets: list[tuple[str, nn.Module, object]],
    calibration: Iterable,
    *,
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Running per-tensor min/max of each target layer's input over the calibration data."""
    ranges: dict[str, list[torch.Tensor]] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach()
            lo, hi = torch.aminmax(x.float())
            if name in ranges:
                ranges[name][0] = torch.minimum(ranges[name][0], lo)
                ranges[name][1] = torch.maximum(ranges[name][1], hi)
            else:
                ranges[name] = [lo, hi]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m, _ in targets]
    try:
        run_calibration(model, calibration, progress)
    finally:
        for h in handles:
            h.remove()
    return {n: (r[0], r[1]) for n, r in ranges.items()}
