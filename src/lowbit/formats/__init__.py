"""Layer 1: number formats and the pure math of quantization (no modules, no models)."""

from lowbit.formats import floating, integer, lookup, mx  # noqa: F401  (register formats)
from lowbit.formats.base import (
    FormatError,
    NumberFormat,
    get_format,
    list_formats,
    register_format,
)
from lowbit.formats.granularity import PER_TENSOR, Granularity
from lowbit.formats.integer import IntFormat, SignFormat
from lowbit.formats.metrics import (
    cosine_similarity,
    error_report,
    max_abs_error,
    mse,
    sqnr_db,
)
from lowbit.formats.packing import pack, packed_size, unpack
from lowbit.formats.rotation import ROTATIONS, hadamard_matrix, has_hadamard, rotate
from lowbit.formats.scaling import (
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    minmax,
    qparams_from_range,
    quantize,
    quantize_tensor,
)
from lowbit.formats.spec import WeightSpec

__all__ = [
    "WeightSpec",
    "PER_TENSOR",
    "FormatError",
    "Granularity",
    "IntFormat",
    "NumberFormat",
    "QParams",
    "ROTATIONS",
    "SignFormat",
    "compute_qparams",
    "cosine_similarity",
    "dequantize",
    "error_report",
    "fake_quantize",
    "get_format",
    "hadamard_matrix",
    "has_hadamard",
    "list_formats",
    "max_abs_error",
    "minmax",
    "mse",
    "pack",
    "packed_size",
    "qparams_from_range",
    "quantize",
    "quantize_tensor",
    "register_format",
    "rotate",
    "sqnr_db",
    "unpack",
]
