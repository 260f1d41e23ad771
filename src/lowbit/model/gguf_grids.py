"""llama.cpp's tensor types as lowbit weight grids: what the ``gguf:<type>`` recipes solve on.

Each type is a ``WeightSpec`` whose grid is exactly the type's (``export/gguf_weights.py``
and ``export/gguf_kquants.py`` carry the codes unchanged):

- Q8_0, Q4_0, Q5_0 (symmetric int8/int4/int5) and Q4_1, Q5_1 (uint4/uint5 with a float
  min): groups of 32 inputs with a float16 scale (and min);
- IQ4_NL: groups of 32 with a float16 scale on llama.cpp's non-linear 16-value table
  (``formats.lookup.IQ4NL_VALUES``), the same 4.5 bits per weight as Q4_0;
- the k-quants: groups of 32 (Q5_K, Q4_K) or 16 (Q6_K, Q3_K, Q2_K) whose scales (and mins)
  are integers times one float16 per super-block of 256 inputs (``formats.superblock``).

A k-quant cannot hold a row whose length (the layer's inputs) is not a multiple of 256;
llama-quantize then writes the tensor in another type (``src/llama-quant.cpp``,
``llama_tensor_get_type``'s fallback: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q3_K and
Q2_K -> Q4_0), and so does lowbit (``fit_row_length``, applied per layer by
``targets.scheme_for_width``): such layers are solved on the fallback's grid.
"""

from __future__ import annotations

from lowbit.formats.superblock import QK_K, super_scale
from lowbit.nn import WeightSpec

#: type -> (format, symmetric, group size, scale dtype)
GGUF_GRIDS = {
    "q8_0": ("int8", True, 32, "fp16"), "q4_0": ("int4", True, 32, "fp16"),
    "q4_1": ("uint4", False, 32, "fp16"), "q5_0": ("int5", True, 32, "fp16"),
    "q5_1": ("uint5", False, 32, "fp16"),
    "q6_k": ("int6", True, 16, "fp16*i8"), "q5_k": ("uint5", False, 32, "fp16*u6"),
    "q4_k": ("uint4", False, 32, "fp16*u6"), "q3_k": ("int3", True, 16, "fp16*i6"),
    "q2_k": ("uint2", False, 16, "fp16*u4"), "iq4_nl": ("iq4nl", True, 32, "fp16"),
}
#: type -> (values, bytes) of one block (ggml-common.h)
BLOCK_SIZES = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22),
               "q5_1": (32, 24), "q6_k": (256, 210), "q5_k": (256, 176), "q4_k": (256, 144),
               "q3_k": (256, 110), "q2_k": (256, 84), "iq4_nl": (32, 18)}
#: types whose llama.cpp quantizer signs ``d`` so that a block's largest-magnitude value
#: lands on the grid's longer negative end (``d = max / -8``): lowbit's specs do the same
SIGNED_SCALE = ("q4_0", "q5_0", "iq4_nl")
#: a k-quant's type for rows that are not a multiple of 256 (llama-quant.cpp)
GGUF_FALLBACK = {"q6_k": "q8_0", "q5_k": "q5_1", "q4_k": "q5_0", "q3_k": "q4_0",
                 "q2_k": "q4_0"}


def bits_per_weight(kind: str) -> float:
    values, nbytes = BLOCK_SIZES[kind]
    return 8 * nbytes / values


def grid_spec(kind: str) -> WeightSpec:
    """The weight spec of GGUF type ``kind`` (``"q4_k"``...)."""
    fmt, symmetric, group, scale_dtype = GGUF_GRIDS[kind]
    return WeightSpec(fmt, f"group:{group}", symmetric, scale_dtype,
                      integer_zero_point=symmetric, signed_scale=kind in SIGNED_SCALE)


def grid_of(spec: WeightSpec) -> str | None:
    """The GGUF type whose grid ``spec`` is (rotation and the scale's sign aside), or None."""
    key = (spec.format, spec.symmetric, spec.group_size, spec.scale_dtype)
    for kind, grid in GGUF_GRIDS.items():
        if grid == key and spec.integer_zero_point == spec.symmetric:
            return kind
    return None


def fit_row_length(spec: WeightSpec, width: int) -> WeightSpec:
    """``spec``, or llama.cpp's fallback grid when ``spec`` is a k-quant's and rows of
    ``width`` inputs do not fill its 256-input super-blocks (rotation kept)."""
    if super_scale(spec.scale_dtype) is None or width % QK_K == 0:
        return spec
    kind = grid_of(spec)
    if kind not in GGUF_FALLBACK:
        return spec  # a super-block grid of no GGUF type: lowbit pads the last super-block
    fallback = grid_spec(GGUF_FALLBACK[kind])
    return WeightSpec(fallback.format, fallback.granularity, fallback.symmetric,
                      fallback.scale_dtype, fallback.integer_zero_point, spec.rotation,
                      fallback.signed_scale)
