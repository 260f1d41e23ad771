"""Layer 5: how to choose the quantized values (RTN, GPTQ, GPTAQ, AWQ, SmoothQuant, HQQ,
k-means, importance-weighted rounding).

Each algorithm takes a weight ``[out, in]`` and calibration statistics and returns a
``QuantResult`` (codes + ``QParams``, optionally an input scale to fold) or a
``CodebookResult`` (indices + per-row codebook). ``registry`` lists them with what they
read and their typed options; ``group`` solves a group of linears that share an input.
Nothing here packs bytes, picks kernels, reads files or prints.
"""

# every algorithm module registers its entry when imported: one line each
from lowbit.algorithms import round_to_nearest  # noqa: F401,I001  (rtn is registered first)
from lowbit.algorithms.awq_search import AWQ, awq
from lowbit.algorithms.base import AlgorithmError, CodebookResult, HessianAccumulator, QuantResult
from lowbit.algorithms.gptq_solver import GPTQ, gptq
from lowbit.algorithms.hqq_solver import HQQ, hqq
from lowbit.algorithms.importance import ImportanceRTN, importance_rtn
from lowbit.algorithms.kmeans_codebook import KMeans, kmeans
from lowbit.algorithms.registry import (
    REGISTRY,
    Algorithm,
    algorithm_names,
    get_algorithm,
    register,
)
from lowbit.algorithms.round_to_nearest import quantize_weight, rtn
from lowbit.algorithms.smoothquant import SmoothQuant, smoothquant_scales
from lowbit.algorithms.stats import InputStats

__all__ = [
    "AWQ",
    "GPTQ",
    "HQQ",
    "REGISTRY",
    "Algorithm",
    "AlgorithmError",
    "CodebookResult",
    "HessianAccumulator",
    "ImportanceRTN",
    "InputStats",
    "KMeans",
    "QuantResult",
    "SmoothQuant",
    "algorithm_names",
    "awq",
    "get_algorithm",
    "gptq",
    "hqq",
    "importance_rtn",
    "kmeans",
    "quantize_weight",
    "register",
    "rtn",
    "smoothquant_scales",
]
