"""Layer 6, evaluation: perplexity, divergence from a baseline, size, speed."""

from lowbit.eval.compare import BaselineLogprobs, ComparisonReport, KLAccumulator
from lowbit.eval.perplexity_windows import PerplexityError, PerplexityResult, perplexity
from lowbit.eval.scoring import evaluate, kernels_of
from lowbit.eval.size import SizeReport, model_size
from lowbit.eval.speed import SpeedReport, measure_speed

__all__ = [
    "BaselineLogprobs",
    "ComparisonReport",
    "KLAccumulator",
    "PerplexityError",
    "PerplexityResult",
    "SizeReport",
    "SpeedReport",
    "evaluate",
    "kernels_of",
    "measure_speed",
    "model_size",
    "perplexity",
]
