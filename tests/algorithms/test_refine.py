"""Refinement of a GPTQ solution: least-squares group parameters and coordinate descent."""

import pytest
import torch

from lowbit.algorithms import rtn
from lowbit.algorithms.refine import objective_rows, refit_group_params
from lowbit.formats import WeightSpec, dequantize

from ._algo_data import make_layer


@pytest.mark.parametrize(("fmt", "gran", "symmetric", "float_zero"), [
    ("uint3", "group:64", False, True), ("uint4", "group:32", False, False),
    ("int4", "channel", True, False), ("int3", "group:64", True, False),
])
def test_refit_recovers_exact_parameters(fmt, gran, symmetric, float_zero):
    """A weight that is exactly ``dequantize(codes, p)`` is recovered from the codes and
    perturbed parameters: the normal equations have ``p`` as their solution."""
    W, X = make_layer(out=16, k=128, tokens=256, seed=3)
    H = 2 * X.T @ X / len(X)
    cfg = WeightSpec(fmt, gran, symmetric=symmetric, scale_dtype="fp32",
                            integer_zero_point=not float_zero)
    res = rtn(W, cfg)
    exact = dequantize(res.codes, res.qparams)
    noisy = res.qparams
    g = torch.Generator().manual_seed(0)
    noisy = type(noisy)(noisy.format, noisy.granularity,
                        noisy.scale * (1 + 0.1 * torch.rand(noisy.scale.shape, generator=g)),
                        noisy.zero_point, noisy.scale_dtype)
    assert float(objective_rows(exact, dequantize(res.codes, noisy), H).sum()) > 1e-3
    gs = cfg.granularity.group_size or W.shape[1]
    fitted, rows = refit_group_params(exact, H, res.codes, noisy, gs)
    assert rows == W.shape[0]
    torch.testing.assert_close(dequantize(res.codes, fitted), exact, atol=1e-4, rtol=1e-4)


def test_refit_never_raises_a_rows_objective():
    """bf16 scales and fp16 zero-points are rounded after the fit; a row whose objective
    that rounding would raise keeps its parameters."""
    W, X = make_layer(out=48, k=128, tokens=512, seed=5)
    H = 2 * X.T @ X / len(X)
    cfg = WeightSpec("uint3", "group:32", symmetric=False, scale_dtype="bf16",
                            integer_zero_point=False)
    res = rtn(W, cfg)
    before = objective_rows(W, dequantize(res.codes, res.qparams), H)
    fitted, rows = refit_group_params(W, H, res.codes, res.qparams, 32)
    after = objective_rows(W, dequantize(res.codes, fitted), H)
    assert torch.all(after <= before)
    assert 0 < rows <= W.shape[0] and float(after.sum()) < 0.9 * float(before.sum())
    assert fitted.scale.dtype == torch.bfloat16 and fitted.zero_point.dtype == torch.float16
