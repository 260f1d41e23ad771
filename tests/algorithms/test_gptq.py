"""GPTQ: parity with the reference code, accuracy against RTN, options, damping, errors."""

from dataclasses import dataclass

import pytest
import torch

from lowbit.algorithms import GPTQ, AlgorithmError, HessianAccumulator, gptq, rtn
from lowbit.formats import FormatError, NumberFormat, WeightSpec, get_format, quantize
from lowbit.formats.base import grid_encode

from ._algo_data import make_layer, output_mse
from ._reference_gptq import reference_gptq


def hessian(X):
    acc = HessianAccumulator(X.shape[1])
    acc.add_batch(X)
    return acc


@pytest.mark.parametrize(("gran", "group", "act_order"),
                         [("channel", -1, False), ("channel", -1, True), ("group:128", 128, False)])
def test_matches_reference_implementation(gran, group, act_order):
    W, X = make_layer(out=32, k=256, tokens=300, seed=1)
    X[:, 7] = 0  # a dead input
    acc = hessian(X)
    expected = reference_gptq(W, acc.H, 4, group, actorder=act_order)
    got = gptq(W, acc, WeightSpec("uint4", gran, symmetric=False), act_order=act_order)
    assert torch.allclose(got.dequantize(), expected, rtol=0, atol=1e-5)
    assert got.info["dead_inputs"] == 1
    assert torch.all(got.dequantize()[:, 7] == 0)


@pytest.mark.parametrize("fmt", ["int3", "int4"])
@pytest.mark.parametrize("gran", ["group:64", "channel"])
def test_beats_rtn_by_a_clear_margin(layer, fmt, gran):
    W, X = layer
    cfg = WeightSpec(fmt, gran)
    base = output_mse(W, X, rtn(W, cfg).dequantize())
    plain = gptq(W, hessian(X), cfg)
    ordered = gptq(W, hessian(X), cfg, act_order=True)
    assert output_mse(W, X, plain.dequantize()) < 0.85 * base
    assert output_mse(W, X, ordered.dequantize()) < 0.7 * base
    assert plain.codes.dtype == torch.int8 and plain.codes.shape == W.shape


@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_partial_last_group(act_order, static_groups):
    W, X = make_layer(out=32, k=200, tokens=256)
    cfg = WeightSpec("uint4", "group:64", symmetric=False, scale_dtype="fp16")
    result = gptq(W, hessian(X), cfg, act_order=act_order, static_groups=static_groups,
                  block_size=48)
    assert result.qparams.scale.shape == (32, 4) and result.qparams.scale.dtype == torch.float16
    assert result.qparams.zero_point.dtype == torch.uint8
    assert output_mse(W, X, result.dequantize()) < output_mse(W, X, rtn(W, cfg).dequantize())


def test_codes_are_consistent_with_returned_qparams(layer):
    """Re-quantizing the dequantized weight with the returned parameters gives the codes."""
    W, X = layer
    result = gptq(W, hessian(X), WeightSpec("int4", "group:64"), act_order=True)
    assert torch.equal(quantize(result.dequantize(), result.qparams), result.codes)


def test_damping_escalates_on_an_indefinite_hessian(layer):
    W, _ = layer
    W = W[:, :64]
    v = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(0)),
                                      dim=0)
    H = torch.eye(64) - 1.05 * torch.outer(v, v)  # one eigenvalue -0.05
    result = gptq(W, H, WeightSpec("int4", "channel"))
    assert result.info["percdamp"] == pytest.approx(0.1)
    assert torch.isfinite(result.dequantize()).all()


def test_rank_deficient_calibration(layer):
    W, _ = layer
    g = torch.Generator().manual_seed(2)
    X = torch.randn(512, 3, generator=g) @ torch.randn(3, 256, generator=g)  # rank 3
    cfg = WeightSpec("int4", "group:64")
    result = gptq(W, hessian(X), cfg, percdamp=0.0)
    assert result.info["percdamp"] > 0
    assert output_mse(W, X, result.dequantize()) < output_mse(W, X, rtn(W, cfg).dequantize())


def test_clear_errors(layer):
    W, X = layer
    cfg = WeightSpec("int4", "channel")
    H = hessian(X).H
    H[0, 1] = float("nan")
    with pytest.raises(AlgorithmError, match=r"\(64, 256\).*NaN"):
        gptq(W, H, cfg)
    v = torch.nn.functional.normalize(torch.ones(256), dim=0)
    with pytest.raises(AlgorithmError, match=r"\(64, 256\).*more .*data.*percdamp"):
        gptq(W, torch.eye(256) - 5 * torch.outer(v, v), cfg)
    with pytest.raises(AlgorithmError, match=r"\[256, 256\]"):
        gptq(W, torch.eye(10), cfg)
    with pytest.raises(AlgorithmError, match="no calibration"):
        gptq(W, HessianAccumulator(256), cfg)
    with pytest.raises(AlgorithmError, match="percdamp"):
        GPTQ(percdamp=2.0)


@dataclass(frozen=True)
class _Codebook(NumberFormat):
    """A lookup format defined here so the test needs nothing beyond the format contract."""

    kind = "lookup"

    @property
    def max_value(self):
        return 1.0

    @property
    def min_value(self):
        return -1.0

    @property
    def code_dtype(self):
        return torch.uint8

    def grid(self):
        return torch.tensor([-1.0, -0.7, -0.53, -0.39, -0.28, -0.18, -0.09, 0.0,
                             0.08, 0.16, 0.25, 0.34, 0.44, 0.56, 0.72, 1.0], dtype=torch.float64)

    def encode(self, y, rounding="nearest", generator=None):
        return grid_encode(y, self.grid(), rounding, generator).to(torch.uint8)

    def decode(self, codes):
        return self.grid().float()[codes.long()]


def _lookup_formats():
    formats = [_Codebook("test-nf4", 4)]
    try:
        formats.append(get_format("nf4"))
    except FormatError:
        pass
    return formats


@pytest.mark.parametrize("fmt", _lookup_formats(), ids=str)
def test_works_with_lookup_formats(layer, fmt):
    W, X = layer
    cfg = WeightSpec(fmt, "group:64")
    result = gptq(W, hessian(X), cfg, act_order=True)
    assert result.codes.dtype == torch.uint8
    assert output_mse(W, X, result.dequantize()) < 0.85 * output_mse(W, X, rtn(W, cfg).dequantize())


def test_static_groups_take_parameters_from_the_original_weight(layer):
    W, X = layer
    cfg = WeightSpec("uint4", "group:64", symmetric=False)
    result = gptq(W, hessian(X), cfg, act_order=True, static_groups=True)
    upfront = rtn(W, cfg).qparams
    assert torch.equal(result.qparams.scale, upfront.scale)
    assert torch.equal(result.qparams.zero_point, upfront.zero_point)
    assert output_mse(W, X, result.dequantize()) < 0.7 * output_mse(W, X, rtn(W, cfg).dequantize())


@pytest.mark.parametrize(("fmt", "gran", "symmetric", "act_order", "static_groups"), [
    ("uint4", "group:64", False, True, False), ("int4", "group:64", True, False, True),
    ("int8", "channel", True, True, False), ("int3", "tensor", True, False, False),
])
def test_integer_column_path_equals_the_generic_one(layer, monkeypatch, fmt, gran, symmetric,
                                                    act_order, static_groups):
    """The inlined integer arithmetic (``IntColumn``) gives the codes ``scaling.quantize``
    gives, bit for bit."""
    import importlib

    gptq_module = importlib.import_module("lowbit.algorithms.gptq_solver")

    W, X = layer
    cfg = WeightSpec(fmt, gran, symmetric=symmetric, scale_dtype="bf16")
    opts = {"act_order": act_order, "static_groups": static_groups}
    fast = gptq(W, hessian(X), cfg, **opts)
    monkeypatch.setattr(gptq_module, "IntColumn", lambda fmt, rows: gptq_module.AnyColumn())
    generic = gptq(W, hessian(X), cfg, **opts)
    assert fast.codes.dtype == generic.codes.dtype
    assert torch.equal(fast.codes, generic.codes)
    assert torch.equal(fast.qparams.scale, generic.qparams.scale)


def test_clip_search_never_worsens_a_groups_weight_error(layer):
    """``clip_ratios`` includes 1.0 (plain min/max), so each group's chosen range has at most
    the plain range's error; a real grid moves some groups."""
    import importlib

    gptq_module = importlib.import_module("lowbit.algorithms.gptq_solver")
    W, X = layer
    cfg = WeightSpec("uint4", "group:64", symmetric=False, scale_dtype="bf16")

    def err(qp):
        return cfg.granularity.rows((quantize_dequantize(W, qp) - W).abs().pow(2.4)).sum(-1)

    from lowbit.formats import dequantize

    def quantize_dequantize(w, qp):
        return dequantize(quantize(w, qp), qp)

    plain = gptq_module.clipped_qparams(W, cfg, cfg.granularity, (), 2.4)
    searched = gptq_module.clipped_qparams(W, cfg, cfg.granularity, (1.0, 0.95, 0.9, 0.85), 2.4)
    assert torch.all(err(searched) <= err(plain) + 1e-6)
    assert not torch.equal(searched.scale, plain.scale)
    res = gptq(W, hessian(X), cfg, clip_ratios=(1.0, 0.95, 0.9, 0.85))
    assert res.codes.shape == W.shape


@pytest.mark.parametrize(("fmt", "gran", "act_order", "float_zero"), [
    ("uint3", "group:64", True, True), ("int4", "channel", False, False),
    ("uint2", "group:32", True, False), ("uint4", "group:64", False, True),
    ("uint4", "group:96", True, True),  # 256 inputs: a partial last group, no refit
])
def test_refinement_lowers_the_gptq_objective(layer, fmt, gran, act_order, float_zero):
    """Refinement after GPTQ (least-squares group parameters, then QuantEase sweeps) lowers
    ``tr(E H E^T)`` (on the damped ``H`` GPTQ solved against) below GPTQ's own loss, keeps
    the parameters' dtypes, codes still match the returned parameters, and the rounds stop
    once a sweep changes nothing."""
    W, X = layer
    cfg = WeightSpec(fmt, gran, symmetric=fmt.startswith("int"), scale_dtype="bf16",
                            integer_zero_point=not float_zero)
    acc = hessian(X)
    plain = gptq(W, acc, cfg, act_order=act_order)
    assert (plain.qparams.zero_point is not None
            and plain.qparams.zero_point.is_floating_point()) == float_zero
    refined = gptq(W, acc, cfg, act_order=act_order, refine_passes=50)
    assert refined.qparams.scale.dtype == plain.qparams.scale.dtype
    if plain.qparams.zero_point is not None:
        assert refined.qparams.zero_point.dtype == plain.qparams.zero_point.dtype
    divides = gran == "channel" or W.shape[1] % cfg.granularity.group_size == 0
    assert (refined.info["refitted_rows"] > 0) == divides
    H = acc.H.clone()
    H.diagonal().add_(plain.info["percdamp"] * float(torch.diagonal(acc.H).mean()))

    def objective(result):
        E = W - result.dequantize()
        return float((E * (E @ H)).sum()) / 2

    assert objective(plain) == pytest.approx(plain.info["loss"], rel=1e-3)
    assert refined.info["refined_loss"] == pytest.approx(objective(refined), rel=1e-3)
    assert objective(refined) < 0.99 * objective(plain)
    assert refined.info["refine_rounds"] < 50
    assert output_mse(W, X, refined.dequantize()) < output_mse(W, X, plain.dequantize())
    assert torch.equal(quantize(refined.dequantize(), refined.qparams), refined.codes)
    with pytest.raises(AlgorithmError, match="refine_passes"):
        gptq(W, acc, cfg, refine_passes=-1)


def test_full_hessian_shrink_is_per_input_rounding(layer):
    """``hessian_shrink=1`` leaves only ``diag(H)``: no error reaches other columns, so the
    codes are round-to-nearest's."""
    W, X = layer
    cfg = WeightSpec("uint4", "group:64", symmetric=False)
    shrunk = gptq(W, hessian(X), cfg, hessian_shrink=1.0)
    assert torch.equal(shrunk.codes, rtn(W, cfg).codes)
    assert not torch.equal(gptq(W, hessian(X), cfg).codes, shrunk.codes)


def test_hessian_shrink_generalizes_past_the_calibration_inputs():
    """Calibrated on strongly correlated inputs, GPTQ pushes error into the directions they
    rarely excite; on inputs of another kind (isotropic) the shrunk Hessian's solution has
    the lower output error, while the unshrunk one stays best on the calibration inputs."""
    g = torch.Generator().manual_seed(3)
    k = 128
    W = torch.randn(64, k, generator=g)
    basis = torch.randn(k, 8, generator=g)
    calib = torch.randn(2048, 8, generator=g) @ basis.T + 0.05 * torch.randn(2048, k, generator=g)
    other = torch.randn(2048, k, generator=g)
    cfg = WeightSpec("int4", "group:32")
    plain = gptq(W, hessian(calib), cfg).dequantize()
    shrunk = gptq(W, hessian(calib), cfg, hessian_shrink=0.6).dequantize()
    assert output_mse(W, other, shrunk) < 0.8 * output_mse(W, other, plain)
    assert output_mse(W, calib, plain) < output_mse(W, calib, shrunk)


def test_hessian_shrink_out_of_range():
    with pytest.raises(AlgorithmError, match="hessian_shrink"):
        GPTQ(hessian_shrink=1.5)
