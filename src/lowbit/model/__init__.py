"""Layer 7, the model API: recipes, ``quantize`` (one pipeline), ``save`` / ``load``, loaders."""

from lowbit.model.api import quantize
from lowbit.model.hub import BUNDLED, bundled_path
from lowbit.model.loaders import ModelLoadError, load_model, load_tokenizer
from lowbit.model.recipe import PRESETS, Recipe, RecipeError, Rule, Scheme
from lowbit.model.serialization import CheckpointError, load, save
from lowbit.model.stream_quantize import StreamedCheckpoint, quantize_checkpoint
from lowbit.model.summary import QuantizeSummary
from lowbit.model.targets import cast_unquantized

__all__ = [
    "BUNDLED",
    "PRESETS",
    "CheckpointError",
    "ModelLoadError",
    "QuantizeSummary",
    "Recipe",
    "RecipeError",
    "Rule",
    "Scheme",
    "StreamedCheckpoint",
    "bundled_path",
    "cast_unquantized",
    "load",
    "load_model",
    "load_tokenizer",
    "quantize",
    "quantize_checkpoint",
    "save",
]
