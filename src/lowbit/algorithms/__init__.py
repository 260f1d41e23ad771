"""Layer 4: how to choose the quantized values (RTN, GPTQ, HQQ, AWQ, SmoothQuant, k-means,
importance-weighted rounding).

Each algorithm takes a weight ``[out, in]`` and calibration statistics and returns a
``QuantResult`` (codes + ``QParams``, optionally an input scale to fold) or a
``CodebookResult`` (indices + per-row codebook). Nothing here packs bytes, picks kernels,
reads files or prints.
"""

from lowbit.algorithms.awq_search import AWQ, awq
from lowbit.algorithms.base import (
    AlgorithmError,
    CodebookResult,
    HessianAccumulator,
    QuantResult,
    rtn,
)
from lowbit.algorithms.gptq_solver import GPTQ, gptq
from lowbit.algorithms.hqq_solver import HQQ, hqq
from lowbit.algorithms.importance import ImportanceRTN, importance_rtn
from lowbit.algorithms.kmeans_codebook import KMeans, kmeans
from lowbit.algorithms.smoothquant import smoothquant_scales

__all__ = [
    "AWQ",
    "GPTQ",
    "HQQ",
    "AlgorithmError",
    "CodebookResult",
    "HessianAccumulator",
    "ImportanceRTN",
    "KMeans",
    "QuantResult",
    "awq",
    "gptq",
    "hqq",
    "importance_rtn",
    "kmeans",
    "rtn",
    "smoothquant_scales",
]
