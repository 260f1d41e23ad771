"""GPTQ's and the refinement's column loops in C (kernels/csrc/solve_ops.c) against the torch
loops they replace (``GPTQ(native=False)``)."""

import shutil

import pytest
import torch

from lowbit.algorithms.gptq_solver import GPTQ
from lowbit.algorithms.refine import objective_rows
from lowbit.formats import WeightSpec, dequantize
from lowbit.kernels import native

from ._algo_data import make_layer

pytestmark = pytest.mark.skipif(
    not (native._cpu_has_avx2_fma() and shutil.which("cc")),
    reason="needs an AVX2/FMA CPU and a C compiler")

CASES = [  # (format, granularity, symmetric, act_order, static_groups, refine passes)
    ("uint4", "group:32", False, True, False, 0),  # lazy groups starting mid-block
    ("int4", "group:64", True, False, False, 0),
    ("uint3", "group:48", False, True, False, 2),  # the refit and the descent
    ("uint4", "group:40", False, True, False, 1),  # groups that do not divide the row
    ("int8", "channel", True, True, False, 1),
    ("uint2", "group:32", False, False, True, 2),  # static groups
]


@pytest.mark.parametrize(("fmt", "gran", "symmetric", "act_order", "static", "passes"), CASES)
def test_c_loops_match_the_torch_loops(fmt, gran, symmetric, act_order, static, passes):
    """Same codes (all but a few ties that float rounding can break), same parameters
    and the same objective, with and without refinement."""
    W, X = make_layer(out=48, k=160, tokens=640, seed=5)
    H = 2 * X.T @ X / len(X)
    cfg = WeightSpec(fmt, gran, symmetric=symmetric, scale_dtype="fp16")
    opts = dict(act_order=act_order, static_groups=static, refine_passes=passes,
                block_size=64)
    assert native.available(), native.why_unavailable()
    ref = GPTQ(native=False, **opts).quantize(W, H, cfg)
    got = GPTQ(native=True, **opts).quantize(W, H, cfg)
    agree = float((ref.codes == got.codes).float().mean())
    assert agree > 0.995, agree
    f_ref = float(objective_rows(W, dequantize(ref.codes, ref.qparams), H).sum())
    f_got = float(objective_rows(W, dequantize(got.codes, got.qparams), H).sum())
    assert abs(f_got - f_ref) <= 2e-3 * f_ref, (f_got, f_ref)
    assert got.info["loss"] == pytest.approx(ref.info["loss"], rel=2e-3)
    if passes:
        assert got.info["refine_rounds"] == ref.info["refine_rounds"]
        assert got.info["refined_loss"] < got.info["loss"]


def test_c_loops_are_bit_exact_on_a_short_block():
    """One block without groups starting inside it: the arithmetic is the reference's,
    operation for operation, so the codes agree exactly."""
    W, X = make_layer(out=32, k=64, tokens=256, seed=2)
    H = 2 * X.T @ X / len(X)
    cfg = WeightSpec("int4", "channel", symmetric=True, scale_dtype="fp32")
    ref = GPTQ(native=False, block_size=64).quantize(W, H, cfg)
    got = GPTQ(native=True, block_size=64).quantize(W, H, cfg)
    torch.testing.assert_close(got.codes, ref.codes, rtol=0, atol=0)
