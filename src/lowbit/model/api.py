"""The model API in one place: ``quantize``, ``save``, ``load`` and the loaders."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lowbit.model.pipeline import quantize_model
from lowbit.model.recipe import Recipe, RecipeError


def quantize(
    model: nn.Module,
    recipe: Recipe | str = "w8",
    calibration: Iterable | None = None,
    *,
    progress: bool = True,
    backend: str | None = None,
    **runner_options,
) -> nn.Module:
    """Quantize ``model`` in place with ``recipe`` (a preset name, grammar string, file or
    ``Recipe``) and return it; ``model.lowbit_summary`` says what was done.

    ``calibration``: an iterable of model inputs (``lowbit.data.text(...)`` builds token
    batches), needed by static activation quantization and calibrated algorithms.
    """
    done = getattr(model, "lowbit_recipe", None)
    if done is not None:
        raise RecipeError(
            f"this model is already quantized ({done.name}); quantize the unquantized model "
            f"(e.g. lowbit.load_model of the source, {getattr(model, 'lowbit_spec', None)!r})")
    quantize_model(model, recipe, calibration, progress=progress, backend=backend,
                   **runner_options)
    return model
